"""The closed loop (`make loop-demo`) on the fixture dataset: a real DVC project, real Ray Serve on loopback,
real whylogs drift check, the labelling CLI's code path, `drift-check --retrain`, the gate and the hot swap."""

from __future__ import annotations

import pytest

from intentops.config import PARAMS_ENV
from support import ROOT, fixture_overrides

pytestmark = pytest.mark.slow


def test_loop_on_fixture_data_detects_drift_retrains_and_swaps(tmp_path, mirror, monkeypatch):
    from intentops.loop_demo import LoopConfig, Progress, run_loop

    monkeypatch.delenv(PARAMS_ENV, raising=False)
    mirror_dir, shas = mirror
    # The fixture is tiny: a few hundred replayed rows are enough, labels from 3 annotators on one intent.
    # A model fitted on it is near-certain of everything (temperature ~0.05), so review thresholds are raised
    # for the queue to fill; Banking77 (make loop-demo) uses the calibrated defaults.
    overrides = fixture_overrides(
        shas,
        [
            "monitor.drift.min_rows=50",
            "monitor.retrain.min_new_labels=5",
            "promote.latency_calls=20",
            "promote.warmup_calls=5",
            "calibrate.fit_temperature=false",
            "calibrate.review.min_confidence=0.95",
            "calibrate.review.min_margin=0.5",
        ],
    )
    cfg = LoopConfig(
        holdout=["pin_blocked"],
        per_intent=20,
        pool_per_intent=20,
        overrides=overrides,
        window_rows=50,
        replay_repeats=8,
        oracle=True,
    )
    result = run_loop(tmp_path / "work", cfg, str(mirror_dir), ROOT, Progress())

    assert result["drift_exit_code"] == 10 and result["drifted_features"]
    assert result["annotation"]["labelled_per_intent"]["pin_blocked"] >= 5
    retrain = result["retrain"]
    assert retrain["new_labels"] >= 5 and retrain["production_after"] != retrain["production_before"]
    assert result["model_after"] == retrain["production_after"] != result["model_before"]
    # Only what the new labels touch reruns; the feedback rows are in train, the test split is unchanged.
    assert {"ingest", "split", "train", "export", "promote", "profile"} <= set(result["after_stages"]["ran"])
    assert result["acc_before_heldout"] == 0.0 and result["acc_after_heldout"] > 0.5
    assert result["acc_after"] > result["acc_before"]
    assert result["acc_oracle"] - result["acc_after"] < 0.2
    # Stages with `persist: true` outputs bypass DVC's run-cache, so the oracle project trains for real.
    assert {"split", "embed", "train", "export"} <= set(result["oracle_stages"]["ran"])
