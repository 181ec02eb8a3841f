"""The champion/challenger gate and the registry, on synthetic predictions."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from intentops.errors import UserError
from intentops.inference.registry import Registry
from intentops.metrics import macro_f1
from intentops.stages.promote import paired_bootstrap_macro_f1, per_class_f1, run_gate, weighted_macro_f1

LABELS = [f"intent_{i}" for i in range(6)]


def noisy(y, error_rate, seed):
    rng = np.random.default_rng(seed)
    pred = y.copy()
    flip = rng.random(len(y)) < error_rate
    pred[flip] = rng.integers(0, len(LABELS), flip.sum())
    return pred


@pytest.fixture
def y():
    return np.random.default_rng(0).integers(0, len(LABELS), 1200)


def test_f1_matches_sklearn(y):
    pred = noisy(y, 0.3, 1)
    np.testing.assert_allclose(per_class_f1(y, pred, 6), f1_score(y, pred, average=None, labels=range(6)))
    assert macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro"))


def test_bootstrap_macro_f1_is_sklearns_over_labels_and_predictions():
    # Class 2 is only predicted, class 3 never occurs: sklearn averages over {0, 1, 2}, and so does the gate.
    y, pred = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    unit = np.ones((1, len(y)))
    assert weighted_macro_f1(y, pred, 4, unit)[0] == pytest.approx(macro_f1(y, pred))
    assert macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_bootstrap_ci_brackets_the_observed_difference(y):
    a, b = noisy(y, 0.10, 1), noisy(y, 0.20, 2)
    boot = paired_bootstrap_macro_f1(y, a, b, 6, n_boot=400, seed=3)
    assert boot["low"] < boot["diff"] < boot["high"]
    assert boot["low"] > 0  # a is clearly better
    same = paired_bootstrap_macro_f1(y, a, a, 6, n_boot=100)
    assert same["low"] == same["high"] == 0


def test_gate_promotes_first_model_within_budget(y):
    gate = run_gate(
        y,
        noisy(y, 0.1, 1),
        None,
        LABELS,
        challenger_p95_ms=20,
        epsilon=0.01,
        delta=0.05,
        latency_budget_ms=50,
    )
    assert gate["promoted"] and "no champion" in gate["reasons"][0]
    assert not run_gate(y, y, None, LABELS, 80, 0.01, 0.05, 50)["promoted"]


def test_gate_rejects_worse_challenger_and_names_why(y):
    champion, worse = noisy(y, 0.05, 1), noisy(y, 0.25, 2)
    gate = run_gate(
        y, worse, champion, LABELS, 10, epsilon=0.01, delta=0.05, latency_budget_ms=50, n_boot=300
    )
    assert not gate["promoted"]
    assert not gate["checks"]["macro_f1"]["passed"] and not gate["checks"]["per_intent_f1"]["passed"]
    assert any("macro-F1 diff" in r for r in gate["reasons"])


def test_gate_rejects_a_single_intent_regression(y):
    champion = noisy(y, 0.05, 1)
    challenger = champion.copy()
    challenger[(y == 2)] = 3  # intent_2 collapses; macro-F1 falls by less than a sixth
    gate = run_gate(
        y, challenger, champion, LABELS, 10, epsilon=0.5, delta=0.05, latency_budget_ms=50, n_boot=200
    )
    assert gate["checks"]["macro_f1"]["passed"] and not gate["checks"]["per_intent_f1"]["passed"]
    assert gate["checks"]["per_intent_f1"]["worst_intent"] == "intent_2" and not gate["promoted"]


def test_gate_accepts_equal_challenger(y):
    champion = noisy(y, 0.1, 1)
    gate = run_gate(y, champion.copy(), champion, LABELS, 10, 0.01, 0.05, 50, n_boot=200)
    assert gate["promoted"]


def test_registry_promote_history_and_rollback(tmp_path):
    from support import write_tiny_onnx_bundle

    reg = Registry.at(tmp_path / "registry")
    assert reg.production() is None
    versions = []
    for confident in (True, False):
        bundle = tmp_path / f"bundle-{confident}"
        versions.append(write_tiny_onnx_bundle(bundle, ["a", "b"], confident))
        reg.add(bundle, versions[-1])
        reg.set_production(versions[-1], event="promote", reason="gate passed")
    v1, v2 = versions
    assert reg.production() == v2 and (reg.fetch(v2) / "card.json").is_file()
    assert reg.rollback() == v1 and reg.production() == v1
    assert [e["event"] for e in reg.history()] == ["promote", "promote", "rollback"]
    with pytest.raises(UserError, match="not in the registry"):
        reg.set_production("v9", event="promote", reason="x")
    with pytest.raises(UserError, match="nothing to roll back"):
        Registry.at(tmp_path / "empty").rollback()
