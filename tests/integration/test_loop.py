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
        in_windows=2,
        shifted_windows=8,
        shadow_sample=1.0,
        oracle=True,
    )
    result = run_loop(tmp_path / "work", cfg, str(mirror_dir), ROOT, Progress())

    assert result["drift_shifted"]["exit_code"] in (10, 13)
    assert result["annotation"]["labelled_per_intent"]["pin_blocked"] >= 5
    # Half the held-out items were corrected through POST /v1/feedback; those corrections reached labels.csv.
    assert result["annotation"]["api_corrections_sent"] >= 2
    assert result["api_corrections_exported"] == result["annotation"]["api_corrections_sent"]
    # Every replayed window has an estimate and an actual accuracy; the shifted ones lost accuracy.
    assert len(result["windows"]) == 10 and result["actual_drop_shifted"] > 0
    assert result["estimated_drop_shifted"] > 0
    retrain = result["retrain"]
    assert retrain["new_labels"] >= 5 and retrain["candidate"] != retrain["production_before"]
    # The candidate ran in shadow before it was promoted; the app then swapped to it.
    assert result["shadow"]["rows"] > 0 and 0.0 <= result["shadow_agreement"] <= 1.0
    assert result["model_after"] == retrain["candidate"] != result["model_before"]
    # Only what the new labels touch reruns; the feedback rows are in train, the test split is unchanged.
    assert {"ingest", "split", "train", "export", "promote", "profile"} <= set(result["after_stages"]["ran"])
    assert result["acc_before_heldout"] == 0.0 and result["acc_after_heldout"] > 0.5
    assert result["acc_after"] > result["acc_before"]
    assert result["acc_oracle"] - result["acc_after"] < 0.2
    # Stages with `persist: true` outputs bypass DVC's run-cache, so the oracle project trains for real.
    assert {"split", "embed", "train", "export"} <= set(result["oracle_stages"]["ran"])
