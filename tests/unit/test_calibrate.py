"""The `calibrate` stage's pure core on synthetic logits, and its config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from intentops.inference.ood import postprocess
from intentops.models.labels import encode_with_oos
from intentops.stages.calibrate import run_calibrate

CFG = {
    "method": "energy",
    "fit_temperature": True,
    "target": {"oos_recall": 0.6},
    "target_without_oos": {"in_scope_precision": 0.9},
    "review": {"min_confidence": 0.5, "min_margin": 0.1},
    "k": 5,
    "shrinkage": 0.1,
    "ece_bins": 15,
}


def synthetic(n_in: int, n_oos: int, k: int = 5, scale: float = 6.0, seed: int = 0):
    """Over-confident logits (scale) for in-scope rows, flatter ones for out-of-scope rows (label −1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n_in)
    logits = rng.normal(0, 1, (n_in, k))
    logits[np.arange(n_in), y] += rng.normal(1.5, 1.0, n_in)  # some rows end up wrong
    oos = rng.normal(0, 1, (n_oos, k)) * 0.5
    emb = rng.normal(size=(n_in + n_oos, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.r_[logits, oos] * scale, np.r_[y, -np.ones(n_oos, np.int64)], emb


@pytest.mark.parametrize("method", ["msp", "energy", "knn", "mahalanobis"])
def test_run_calibrate_with_oos_rows(method):
    vl, vy, ve = synthetic(1000, 200, seed=1)
    tl, ty, te = synthetic(1000, 200, seed=2)
    trl, try_, tre = synthetic(500, 0, seed=3)
    res = run_calibrate(vl, vy, tl, ty, {**CFG, "method": method}, "oos", ve, te, tre, try_)
    cal, m = res["calibration"], res["metrics"]
    assert set(cal) == {"temperature", "ood", "review", "oos_label", "oos_index", "fitted_on"}
    assert cal["oos_index"] is None and cal["fitted_on"] == "val"
    recall = m["calibration_rows"]["expected"]["oos_recall"]  # 200 OOS rows: about +-0.07 around the target
    assert recall["low"] <= 0.6 <= recall["high"]
    assert len(m["warnings"]) == (recall["low"] < 0.6 - CFG.get("max_shortfall", 0.05))
    assert cal["temperature"] > 2  # logits were scaled x6: a temperature well above 1 undoes it
    assert m["val"]["ece_after"] < m["val"]["ece_before"]
    assert m["val"]["oos_recall"] >= 0.6
    assert {"method", "threshold", "higher_is_ood", "target"} <= set(cal["ood"]) and "stats" not in cal["ood"]
    json.dumps(cal)  # json-able without the arrays
    assert 0 <= m["test"]["oos_auroc"] <= 1 and "oos_fpr_at_95_tpr" in m["test"]
    assert res["plots"]["roc"] and res["plots"]["risk_coverage"]
    if method in ("knn", "mahalanobis"):
        assert res["stats"]
    # postprocess with the written calibration reproduces the stage's own test numbers
    out = postprocess(tl, {**cal, "ood": {**cal["ood"], "stats": res["stats"]}}, te)
    assert out["out_of_scope"][ty < 0].mean() == pytest.approx(m["test"]["oos_recall"])


def test_run_calibrate_without_oos_uses_in_scope_target():
    vl, vy, _ = synthetic(2000, 0, seed=4)
    tl, ty, _ = synthetic(2000, 0, seed=5)
    m = run_calibrate(vl, vy, tl, ty, {**CFG, "method": "msp"}, None)["metrics"]
    assert m["val"]["in_scope_precision"] >= 0.9 and m["val"]["coverage"] < 1
    assert "oos_recall" not in m["test"] and "error_detection_auroc" in m["test"]


def test_unknown_method_is_a_user_error():
    from intentops.errors import UserError

    vl, vy, _ = synthetic(50, 0)
    with pytest.raises(UserError, match="calibrate.method"):
        run_calibrate(vl, vy, vl, vy, {**CFG, "method": "odin"}, None)


def test_encode_with_oos_marks_unknown_labels():
    import pandas as pd

    ids = encode_with_oos(pd.DataFrame({"label": ["b", "oos", "a"]}), ["a", "b"])
    assert ids.tolist() == [1, -1, 0]
    # Trained as a class (split.oos_as_class), "oos" is still out-of-scope.
    ids = encode_with_oos(pd.DataFrame({"label": ["b", "oos", "a"]}), ["a", "b", "oos"], "oos")
    assert ids.tolist() == [1, -1, 0]


def with_oos_class(logits: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Append a trained out-of-scope column: high on about half the out-of-scope rows, low elsewhere."""
    rng = np.random.default_rng(seed)
    col = rng.normal(-2, 1, len(y))
    caught = (y < 0) & (rng.random(len(y)) < 0.4)
    col[caught] = logits[caught].max(axis=1) + 2
    return np.c_[logits, col]


def test_run_calibrate_with_an_oos_class_counts_its_rows_towards_the_target():
    vl, vy, _ = synthetic(1000, 200, seed=6)
    tl, ty, _ = synthetic(1000, 200, seed=7)
    vl, tl = with_oos_class(vl, vy, 8), with_oos_class(tl, ty, 9)
    res = run_calibrate(vl, vy, tl, ty, CFG, "oos", oos_index=5)
    cal, m = res["calibration"], res["metrics"]
    assert cal["oos_index"] == 5
    by_class = postprocess(vl, {"temperature": cal["temperature"], "oos_index": 5})["out_of_scope"]
    assert 0.3 < by_class[vy < 0].mean() < 0.5
    # The class flags ~40 % of val's out-of-scope rows; the energy threshold adds just enough for 60 %.
    assert m["val"]["oos_recall"] == pytest.approx(0.6, abs=1 / 200)
    out = postprocess(tl, cal)
    assert out["out_of_scope"][ty < 0].mean() == pytest.approx(m["test"]["oos_recall"])
    assert out["out_of_scope"][out["pred"] == 5].all()


def test_config_has_a_valid_calibrate_node():
    from intentops.config import compose
    from intentops.inference.ood import METHODS, TARGETS

    cfg = compose(["logger=none"])
    assert cfg.calibrate.method in METHODS
    for key in ("target", "target_without_oos"):
        assert len(cfg.calibrate[key]) == 1 and next(iter(cfg.calibrate[key])) in TARGETS
    for key in (
        "calibration",
        "calibration_stats",
        "calibrate_metrics",
        "calibrate_roc",
        "calibrate_risk_coverage",
    ):
        assert key in cfg.paths
