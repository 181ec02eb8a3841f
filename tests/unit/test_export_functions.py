"""Pure functions of export, the ONNX Predictor's post-processing and promote's label mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intentops.inference.bundle import OOD_STATS_FILE, content_version
from intentops.inference.ood import load_calibration, normalize_calibration, softmax
from intentops.models.labels import label_ids
from intentops.stages.export import build_card, bundle_calibration, parity_report, read_calibration


def test_parity_report_passes_and_fails_on_each_criterion():
    ref = np.array([[0.7, 0.3], [0.2, 0.8]], dtype=np.float32)
    ok = parity_report(ref, ref + np.float32(1e-6), min_agreement=0.999, max_abs_diff=1e-4)
    assert (
        ok["passed"]
        and ok["argmax_agreement"] == 1.0
        and ok["max_abs_prob_diff"] == pytest.approx(1e-6, rel=0.1)
    )
    drift = parity_report(ref, ref + np.array([[0.001, -0.001], [0, 0]], dtype=np.float32), 0.999, 1e-4)
    assert not drift["passed"] and drift["argmax_agreement"] == 1.0
    flipped = parity_report(ref, ref[:, ::-1], 0.5, 1.0)
    assert not flipped["passed"] and flipped["argmax_disagreements"] == 2


def test_content_version_covers_what_predicts_not_the_card(tmp_path):
    for name, data in {
        "model.onnx": b"graph",
        "labels.json": b'["a"]',
        "calibration.json": b"{}",
        "card.json": b"{}",
    }.items():
        (tmp_path / name).write_bytes(data)
    v1 = content_version(tmp_path)
    assert v1.startswith("m-") and len(v1) == 14
    (tmp_path / "card.json").write_bytes(b'{"git_revision": "abc"}')
    assert content_version(tmp_path) == v1
    (tmp_path / "calibration.json").write_bytes(b'{"temperature": 1.5}')
    assert content_version(tmp_path) != v1


def test_softmax_temperature_flattens_without_changing_the_ranking():
    logits = np.array([[2.0, 1.0, 0.0]], dtype=np.float32)
    p1, p2 = softmax(logits), softmax(logits, temperature=2.0)
    np.testing.assert_allclose(p1.sum(1), 1.0, rtol=1e-6)
    assert p2[0, 0] < p1[0, 0] and (p2.argsort() == p1.argsort()).all()


def test_bundle_calibration_carries_the_fitted_method_threshold_and_review(tmp_path):
    fitted = {
        "temperature": 1.4,
        "oos_label": "oos",
        "review": {"min_confidence": 0.6},
        "ood": {"method": "energy", "threshold": -7.5, "higher_is_ood": True, "stats_file": "x.npz", "k": 10},
        "oos_index": 80,
    }
    cal, stats = bundle_calibration(fitted, 1.0, {"min_confidence": 0.5, "min_margin": 0.1})
    assert stats == {} and cal == {
        "temperature": 1.4,
        "oos_label": "oos",
        "oos_index": 80,  # a trained out-of-scope class (split.oos_as_class) keeps its column in the bundle
        "review": {"min_confidence": 0.6, "min_margin": 0.1},
        "ood": {"method": "energy", "threshold": -7.5, "higher_is_ood": True, "k": 10},
    }
    # No calibrate stage output: the train bundle's temperature, export's review defaults, no OOS method.
    cal, _ = bundle_calibration({}, 1.2, {"min_confidence": 0.5, "min_margin": 0.1})
    assert (
        cal["temperature"] == 1.2
        and cal["ood"] == {}
        and cal["oos_index"] is None
        and cal["review"] == {"min_confidence": 0.5, "min_margin": 0.1}
    )
    # Embedding methods: the statistics travel in the bundle under a fixed name that load_calibration follows.
    bank = np.eye(3, dtype=np.float16)
    cal, stats = bundle_calibration(
        {"ood": {"method": "knn", "threshold": 0.3, "stats": {"bank": bank}}},
        1.0,
        {"min_confidence": 0.5, "min_margin": 0.1},
    )
    assert cal["ood"]["stats_file"] == OOD_STATS_FILE and list(stats) == ["bank"]
    (tmp_path / "calibration.json").write_text(json.dumps(cal))
    with open(tmp_path / OOD_STATS_FILE, "wb") as fh:
        np.savez(fh, **stats)
    np.testing.assert_array_equal(
        load_calibration(tmp_path / "calibration.json")["ood"]["stats"]["bank"], bank
    )


def test_legacy_bundle_calibration_is_normalised():
    assert normalize_calibration({"temperature": 2.0, "min_confidence": 0.5, "min_margin": 0.1}) == {
        "temperature": 2.0,
        "review": {"min_confidence": 0.5, "min_margin": 0.1},
        "ood": {},
    }


def test_label_ids_maps_unknown_champion_labels_to_an_extra_class():
    assert label_ids(["b", "zzz", "a"], ["a", "b"], unknown=2).tolist() == [1, 2, 0]


def test_read_calibration_prefers_a_fitted_temperature(tmp_path):
    assert read_calibration(tmp_path, {}) == {"temperature": 1.0}
    assert read_calibration(tmp_path, {"temperature": 1.7}) == {"temperature": 1.7}
    (tmp_path / "calibration.json").write_text('{"temperature": 1.3}')
    assert read_calibration(tmp_path, {"temperature": 1.7}) == {"temperature": 1.3}


def test_card_without_reports():
    result = {
        "parity": {"argmax_agreement": 1.0, "max_abs_prob_diff": 1e-6},
        "metrics": {"fp32": {"accuracy": 0.9, "macro_f1": 0.8, "sentences_per_s": 100.0, "bytes": 1}},
    }
    card = build_card(
        "m-1", {"train": None, "eval": None}, result, {"test": "ab"}, {"model": {"name": "x"}}, "unknown"
    )
    assert (
        card["model"] == "x"
        and not {"created", "wandb"} & set(card)
        and card["metrics"]["export"]["fp32"]["accuracy"] == 0.9
    )
    assert card["data"]["sha256"] == {"test": "ab"} and card["git_revision"] == "unknown"
    assert card["calibration"]["out_of_scope"] == {"stats_file": None}  # no calibration: nothing flagged OOS
    cal = {
        "temperature": 1.3,
        "ood": {"method": "energy", "threshold": -7.5, "higher_is_ood": True},
        "review": {"min_confidence": 0.5, "min_margin": 0.1},
        "oos_label": "oos",
    }
    card = build_card("m-1", {}, result, {}, {}, "unknown", cal)
    assert card["calibration"]["out_of_scope"] == {
        "method": "energy",
        "threshold": -7.5,
        "higher_is_ood": True,
        "stats_file": None,
    }
    assert card["calibration"]["temperature"] == 1.3 and card["calibration"]["review"] == cal["review"]
