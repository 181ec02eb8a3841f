"""The int8 graph's own calibration and its accuracy check: refit, per-variant loading, bundle.json's contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intentops.inference.ood import (
    is_ood,
    postprocess,
    refit_calibration,
    softmax,
    variant_calibration,
)
from intentops.stages.export import variant_check

FP32 = {
    "temperature": 1.2,
    "ood": {"method": "energy", "higher_is_ood": True, "threshold": -5.0, "target": {"oos_recall": 0.7}},
    "review": {"min_confidence": 0.5, "min_margin": 0.1},
    "oos_label": "oos",
    "oos_index": None,
}


@pytest.mark.parametrize(
    ("fp32", "int8", "max_drop", "drop", "fit"),
    [
        (0.9419, 0.9377, 0.5, 0.42, True),
        (0.9247, 0.8978, 0.5, 2.69, False),
        (0.9419, 0.9419, 0.0, 0.0, True),  # no loss is fit even with no allowance
        (0.90, 0.91, 0.0, -1.0, True),  # int8 better than fp32
        (0.9419, 0.9377, 0.4, 0.42, False),
    ],
)
def test_variant_check_records_the_drop_in_points_and_whether_it_fits(fp32, int8, max_drop, drop, fit):
    check = variant_check(fp32, int8, max_drop)
    assert check == {
        "accuracy": int8,
        "fp32_accuracy": fp32,
        "drop_pt": drop,
        "max_drop_pt": max_drop,
        "fit": fit,
    }
    assert isinstance(check["fit"], bool) and json.loads(json.dumps(check)) == check


def test_variant_calibration_applies_the_variants_own_temperature_and_threshold():
    stored = {**FP32, "variants": {"int8": {"temperature": 1.5, "threshold": -6.0}}}
    fp32 = variant_calibration(stored, None)
    assert fp32 == FP32  # fp32 (and a torch bundle) never see the variants entry
    int8 = variant_calibration(stored, "int8")
    assert int8["temperature"] == 1.5 and int8["ood"]["threshold"] == -6.0
    assert {k: v for k, v in int8["ood"].items() if k != "threshold"} == {
        k: v for k, v in FP32["ood"].items() if k != "threshold"
    }
    assert int8["review"] == FP32["review"] and "variants" not in int8
    assert stored["ood"]["threshold"] == -5.0  # the stored record is left as it was
    # A bundle without an entry for the variant (exported before this, or nothing fitted): fp32's calibration.
    assert variant_calibration(FP32, "int8") == FP32
    assert (
        variant_calibration({**stored, "variants": {"int8": {"temperature": 0.9}}}, "int8")["ood"]
        == FP32["ood"]
    )


def test_refit_calibration_follows_a_graph_whose_logits_moved():
    """A variant whose logits are 1.5x fp32's (as a coarser graph could give): the refit temperature absorbs the
    scale, and the threshold meets the same OOS-recall target on val."""
    rng = np.random.default_rng(0)
    k, n_in, n_oos = 8, 2000, 300
    y_in = rng.integers(0, k, n_in)
    logits_in = rng.normal(0, 1, (n_in, k))
    logits_in[np.arange(n_in), y_in] += 4.0
    logits = np.r_[logits_in, rng.normal(0, 1, (n_oos, k))]  # out-of-scope rows: no class stands out
    y = np.r_[y_in, -np.ones(n_oos, dtype=int)]
    fitted = refit_calibration(FP32, logits, y)
    moved = refit_calibration(FP32, 1.5 * logits, y)
    assert set(fitted) == set(moved) == {"temperature", "threshold"}
    assert moved["temperature"] == pytest.approx(1.5 * fitted["temperature"], rel=0.02)
    # Same probabilities under each graph's own temperature, so the same calibration quality.
    np.testing.assert_allclose(
        softmax(logits, fitted["temperature"]), softmax(1.5 * logits, moved["temperature"]), atol=0.02
    )
    int8 = variant_calibration({**FP32, "variants": {"int8": moved}}, "int8")
    out = postprocess(1.5 * logits, int8)
    recall = out["out_of_scope"][y < 0].mean()
    assert 0.7 <= recall < 0.72
    np.testing.assert_array_equal(out["out_of_scope"], is_ood(out["ood_score"], moved["threshold"], True))


def test_refit_calibration_keeps_what_was_not_fitted():
    logits = np.eye(3) * 5
    y = np.arange(3)
    # T = 1 and no target: nothing was fitted for fp32 (no calibrate stage), so nothing is for the variant.
    assert refit_calibration({"temperature": 1.0, "ood": {}}, logits, y) == {}
    assert refit_calibration({**FP32, "ood": {**FP32["ood"], "target": None}}, logits, y).keys() == {
        "temperature"
    }
    assert refit_calibration(FP32, logits[:0], y[:0]) == {}  # no val rows: nothing to fit on


def two_variant_bundle(tmp_path, int8_confident: bool, calibration: dict):
    """A sealed tiny ONNX bundle with a near-uniform fp32 graph, an int8 entry (the same graph, or a confident
    one) and `calibration`; (fp32, int8) as `Predictor.load` serves them."""
    from intentops.inference import bundle as layout
    from intentops.inference.predictor import Predictor
    from intentops.io import write_json
    from support import write_tiny_onnx_bundle

    bundle = tmp_path / "bundle"
    write_tiny_onnx_bundle(bundle, ["a", "b", "c"], confident=False)
    graph = bundle
    if int8_confident:
        graph = tmp_path / "confident"
        write_tiny_onnx_bundle(graph, ["a", "b", "c"], confident=True)
    (bundle / layout.INT8_FILE).write_bytes((graph / layout.ONNX_FILE).read_bytes())
    meta = json.loads((bundle / layout.BUNDLE_META).read_text())
    write_json(
        bundle / layout.BUNDLE_META, {**meta, "variants": {"fp32": "model.onnx", "int8": "model.int8.onnx"}}
    )
    write_json(bundle / layout.CALIBRATION_FILE, calibration)
    layout.seal(bundle)
    layout.verify_bundle(bundle)
    return Predictor.load(bundle), Predictor.load(bundle, variant="int8")


def test_int8_calibration_is_what_predictor_load_applies(tmp_path):
    """Predictor.load(..., variant="int8") applies the int8 entry of calibration.json; fp32 keeps its own."""
    calibration = {**FP32, "variants": {"int8": {"temperature": 4.0, "threshold": 1e9}}}
    fp32, int8 = two_variant_bundle(tmp_path, int8_confident=False, calibration=calibration)
    assert fp32.calibration["temperature"] == 1.2 and fp32.calibration["ood"]["threshold"] == -5.0
    assert int8.calibration["temperature"] == 4.0 and int8.calibration["ood"]["threshold"] == 1e9
    text = ["my card was stolen"]
    # Same graph bytes, so the same logits: only the calibration differs (hotter = flatter).
    np.testing.assert_allclose(fp32.logits(text), int8.logits(text))
    assert int8.predict_proba(text).max() < fp32.predict_proba(text).max()
    # threshold 1e9: no energy reaches it, so the int8 calibration flags nothing as out_of_distribution.
    assert int8.predict(text)[0]["reason"] != "out_of_distribution"


@pytest.mark.parametrize(
    ("int8_val", "holds"),
    [
        ({"ece": 0.019, "coverage": 0.955, "oos_recall": 0.745}, True),  # within 0.01 on each
        ({"ece": 0.021, "coverage": 0.95, "oos_recall": 0.75}, False),  # ECE more than 0.01 worse
        ({"ece": 0.01, "coverage": 0.93, "oos_recall": 0.75}, False),  # coverage 2 pt off
        ({"ece": 0.01, "coverage": 0.95, "oos_recall": 0.775}, False),  # recall 2.5 pt off, even upward
        ({"ece": 0.0, "coverage": 0.95}, True),  # no out-of-scope rows on val: no recall to compare
    ],
)
def test_fp32_calibration_holds_for_int8_only_within_a_point(int8_val, holds):
    from intentops.stages.export import fp32_calibration_holds

    fp32_val = {"ece": 0.01, "coverage": 0.95, "oos_recall": 0.75}
    assert fp32_calibration_holds(fp32_val, int8_val) is holds


@pytest.mark.parametrize("fitted_on, refit", [("val", True), ("crossfit", False)])
def test_int8_is_refit_on_val_only_when_val_was_what_fp32_was_fitted_on(tmp_path, fitted_on, refit):
    """A cross-fitted calibration (a small val, which with train.crossfit.refit also trained the model) is never
    refit for int8 on val: fp32's applies, and the check says why."""
    from intentops.stages.export import int8_calibration

    fp32, int8 = two_variant_bundle(
        tmp_path, int8_confident=True, calibration={**FP32, "fitted_on": fitted_on}
    )
    texts = ["my card was stolen", "what is the rate", "top up failed", "pin blocked"] * 5
    own, check = int8_calibration(fp32, int8, texts, np.array([0, 1, 2, -1] * 5), 8, 10)
    assert check["fp32_calibration_holds"] is False  # the two graphs disagree on purpose
    assert bool(own) is refit and ("refit" in check) is not refit
