"""Label-free accuracy estimate (monitor/performance.py) on simulated calibrated traffic, read back from real
whylogs profiles, and the effect-size rule of the drift tests (drift that matters)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from intentops.monitor.drift import DRIFT, NO_DRIFT, compare
from intentops.monitor.features import OUT_OF_DISTRIBUTION, utterance_features
from intentops.monitor.performance import (
    METHOD_CONFIDENCE,
    METHOD_FLAGS,
    WindowStats,
    estimate,
    estimate_view,
    reference_stats,
    window_stats,
)
from intentops.monitor.profiles import ProfileWindowWriter, profile_frame, read_windows, window_info

INTENTS = [f"intent_{i}" for i in range(20)]


def traffic(n: int, seed: int, novel_share: float = 0.0, ood_rate: float = 0.05, caught: float = 0.8) -> dict:
    """Calibrated in-distribution rows (right with probability = confidence; the detector flags `ood_rate` of
    them, the less confident ones, right 60 % of the time) plus `novel_share` rows of intents the model does not
    have: always wrong, confident, flagged with probability `caught`."""
    rng = np.random.default_rng(seed)
    n_novel = int(n * novel_share)
    n_in = n - n_novel
    conf = np.clip(rng.beta(12, 1, n_in), 0.3, 1.0)
    flagged = rng.random(n_in) < ood_rate
    conf[flagged] = rng.uniform(0.3, 0.9, flagged.sum())
    correct = rng.random(n_in) < np.where(flagged, 0.6, conf)
    novel_conf = rng.uniform(0.5, 0.95, n_novel)
    novel_flagged = rng.random(n_novel) < caught
    confidence = np.concatenate([conf, novel_conf])
    reasons = [OUT_OF_DISTRIBUTION if f else None for f in np.concatenate([flagged, novel_flagged])]
    correct = np.concatenate([correct, np.zeros(n_novel, dtype=bool)])
    intents = [INTENTS[i] for i in rng.integers(0, len(INTENTS) - 5 * (novel_share > 0), n)]
    return {"confidence": confidence, "reason": reasons, "correct": correct, "intent": intents}


def features(t: dict) -> pd.DataFrame:
    preds = [
        {"intent": i, "confidence": float(c), "reason": r}
        for i, c, r in zip(t["intent"], t["confidence"], t["reason"], strict=True)
    ]
    return utterance_features(["my card"] * len(preds), frozenset({"my", "card"}), preds)


@pytest.fixture(scope="module")
def ref() -> dict:
    val = traffic(3000, seed=100)
    return reference_stats(val["confidence"].tolist(), val["reason"], val["correct"].tolist())


def test_reference_stats_measure_flagged_and_in_scope_rows():
    stats = reference_stats(
        [0.9, 0.8, 0.4, 0.6], [None, "low_confidence", OUT_OF_DISTRIBUTION, None], [1, 1, 0, 0]
    )
    assert stats["rows"] == 4 and stats["ood_rows"] == 1 and stats["ood_share"] == 0.25
    assert stats["ood_accuracy"] == 0.0 and stats["accuracy"] == 0.5
    assert stats["in_scope_rows"] == 3
    assert stats["offset"] == pytest.approx(2 / 3 - (0.9 + 0.8 + 0.6) / 3)
    with pytest.raises(ValueError, match="as many"):
        reference_stats([0.9], [None, None], [1])


def test_profile_gives_the_same_statistics_as_the_rows(ref):
    t = traffic(1500, seed=1)
    stats = window_stats(profile_frame(features(t)))
    in_scope = t["confidence"][[r != OUT_OF_DISTRIBUTION for r in t["reason"]]]
    assert stats.rows == 1500 and stats.ood == 1500 - len(in_scope) and stats.flags
    assert stats.in_mean == pytest.approx(in_scope.mean(), abs=1e-9)
    assert stats.in_var == pytest.approx(in_scope.var(ddof=1), rel=1e-6)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_in_distribution_estimate_is_within_two_points_and_covers_the_actual(ref, seed):
    t = traffic(1200, seed=seed)
    est = estimate_view(profile_frame(features(t)), ref)
    actual = t["correct"].mean()
    assert est["method"] == METHOD_FLAGS
    assert abs(est["estimated_accuracy"] - actual) <= 0.02
    assert est["low"] <= actual <= est["high"]
    assert est["high"] - est["low"] < 0.1  # an interval that says something


def test_shifted_traffic_drop_is_seen_where_mean_confidence_misses_it(ref):
    base = traffic(1200, seed=5)
    shifted = traffic(1200, seed=6, novel_share=0.6)
    est_base = estimate_view(profile_frame(features(base)), ref)["estimated_accuracy"]
    est = estimate_view(profile_frame(features(shifted)), ref)
    plain = estimate_view(profile_frame(features(shifted)), None)
    actual_drop = base["correct"].mean() - shifted["correct"].mean()
    assert actual_drop > 0.4
    assert est_base - est["estimated_accuracy"] >= actual_drop / 2
    assert est["novel_share"] > 0.3
    # plain mean confidence (CBPE without the flags) sees much less of it
    assert plain["method"] == METHOD_CONFIDENCE
    assert est_base - plain["estimated_accuracy"] < (est_base - est["estimated_accuracy"]) * 0.7


def test_profiles_without_flags_fall_back_to_mean_confidence(ref):
    t = traffic(500, seed=7)
    df = features(t).drop(columns=["review_reason", "in_scope_confidence"])
    est = estimate_view(profile_frame(df), ref)
    assert est["method"] == METHOD_CONFIDENCE
    assert est["ood_share"] == 0 and est["novel_share"] == 0
    assert (
        estimate_view(profile_frame(df.drop(columns=["confidence", "margin", "predicted_intent"])), ref)
        is None
    )
    with pytest.raises(ValueError, match="no rows"):
        estimate(WindowStats(0, 0, 0, 0.0, 0.0), ref)


def test_windows_carry_model_version_variant_and_times(tmp_path):
    clock = iter(float(t) for t in range(1_700_000_000, 1_700_001_000))
    closed: list[str] = []
    writer = ProfileWindowWriter(
        str(tmp_path), max_rows=100, clock=lambda: next(clock), on_close=lambda p, v: closed.append(p)
    )
    t = features(traffic(60, seed=8))
    writer.log(t.iloc[:30], {"model_version": "m-1", "variant": "int8"})
    writer.log(t.iloc[30:], {"model_version": "m-2", "variant": "fp32"})  # a new model closes the window
    writer.flush()
    windows = read_windows(str(tmp_path), 10)
    infos = [window_info(p, v) for p, v in windows]
    assert [(i["model_version"], i["variant"]) for i in infos] == [("m-1", "int8"), ("m-2", "fp32")]
    assert closed == [p for p, _ in windows]
    assert all(i["start"] <= i["end"] for i in infos) and infos[0]["end"] <= infos[1]["start"]
    assert [int(v.metadata["rows"]) for _, v in windows] == [30, 30]


def _frame(
    n: int, seed: int, digits_share: float, intents: list[str], conf: tuple[float, float]
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "has_digits": (rng.random(n) < digits_share).astype("int64"),
            "predicted_intent": rng.choice(intents, n),
            "confidence": rng.beta(*conf, n),
        }
    )


CFG = {
    "algorithms": {"has_digits": "chi_square", "predicted_intent": "chi_square", "confidence": "ks"},
    "thresholds": {
        "ks": {"drift": 0.01, "possible_drift": 0.05},
        "chi_square": {"drift": 0.01, "possible_drift": 0.05},
    },
    "min_effect": {"ks": 0.1, "chi_square": 0.1, "hellinger": 0.0},
    "min_drifted_features": 1,
}


def test_a_tiny_change_over_many_rows_is_significant_but_not_drift():
    reference = profile_frame(_frame(40_000, 1, 0.98, INTENTS, (12, 1)))
    current = profile_frame(_frame(40_000, 2, 0.99, INTENTS, (12, 1)))
    report = compare(reference, current, CFG)
    digits = report["features"]["has_digits"]
    assert digits["value"] < CFG["thresholds"]["chi_square"]["drift"]  # the p-value alone would call it drift
    assert digits["effect"] == pytest.approx(0.01, abs=0.004) and digits["category"] == NO_DRIFT
    assert report["drift"] is False
    # without a minimum effect the same p-value is DRIFT: the rule is what changed the verdict
    no_min = compare(reference, current, {**CFG, "min_effect": {}})
    assert no_min["features"]["has_digits"]["category"] == DRIFT


def test_a_held_out_intent_like_shift_is_still_drift():
    reference = profile_frame(_frame(5000, 1, 0.98, INTENTS[:15], (12, 1)))
    current = profile_frame(_frame(5000, 3, 0.98, INTENTS[10:], (3, 2)))  # new intent mix, lower confidence
    report = compare(reference, current, CFG)
    assert {"predicted_intent", "confidence"} <= set(report["drifted_features"])
    assert report["features"]["predicted_intent"]["effect"] > 0.3
    assert report["features"]["confidence"]["effect"] > 0.3
    assert "has_digits" not in report["drifted_features"]


def test_serving_sink_tags_windows_per_model_and_sets_the_gauge(tmp_path, ref):
    """ProfileSink (the replica's): one window per (model_version, variant), flags profiled, gauge set on close."""
    import json

    from intentops.api.recorder import ProfileSink

    (tmp_path / "vocab.json").write_text(json.dumps({"min_count": 2, "tokens": ["card"], "performance": ref}))
    sink = ProfileSink()
    monitoring = {"enabled": True, "vocab": "vocab.json", "profiles": "prof", "window_max_rows": 100}
    sink.open({**monitoring, "window_max_seconds": 3600, "flush_s": 1.0}, tmp_path)
    assert sink.performance == ref
    row = {"intent": "a", "confidence": 0.9, "top_k": [{"intent": "a", "confidence": 0.9}], "reason": None}
    flagged = {**row, "confidence": 0.4, "reason": OUT_OF_DISTRIBUTION}
    sink.add(["my card", "x"], [{**row, "model_version": "m-1"}, {**flagged, "model_version": "m-1"}], "int8")
    sink.add(["y"], [{**row, "model_version": "m-2"}], "fp32")
    sink.close()
    windows = read_windows(str(tmp_path / "prof"), 10)
    assert [(window_info(p, v)["model_version"], window_info(p, v)["variant"]) for p, v in windows] == [
        ("m-1", "int8"),
        ("m-2", "fp32"),
    ]
    assert window_stats(windows[0][1]).ood == 1
    assert sink.gauge is not None  # the intentops_estimated_accuracy gauge, set when a window closed
