"""Stage `promote`: the champion/challenger gate, then the registry update.

The challenger is promoted only if all three hold:
  1. macro-F1 is no worse than the champion's by more than `epsilon`: the lower end of a paired bootstrap
     confidence interval of (challenger - champion) macro-F1 on the same test set is >= -epsilon;
  2. no intent's F1 drops by more than `delta`;
  3. p95 single-request latency is within `latency_budget_ms`.
With no champion, the first model is promoted (checks 1 and 2 have nothing to compare against).
"""

from __future__ import annotations

import numpy as np


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """F1 of each class; `weights` (B, n) gives B resampled versions at once (then the result is (B, k)).

    A class with no true and no predicted rows has F1 0, as in sklearn's `zero_division=0`.
    """
    correct = (y_true == y_pred).astype(np.float64)
    onehot_true = np.eye(n_classes)[y_true]  # (n, k)
    onehot_pred = np.eye(n_classes)[y_pred]
    w = np.ones((1, len(y_true))) if weights is None else weights
    tp = w @ (onehot_true * correct[:, None])
    support = w @ onehot_true
    predicted = w @ onehot_pred
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1[0] if weights is None else f1


def paired_bootstrap_macro_f1(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int,
    n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> dict:
    """Paired bootstrap of macro-F1(a) - macro-F1(b): the same resampled rows score both models.

    Returns:
        {"diff": observed difference, "low": CI lower end, "high": CI upper end, "n_boot": ..., "confidence": ...}
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    diffs = []
    for start in range(0, n_boot, 200):  # chunks keep the (B, n) weight matrix small
        b = min(200, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        weights = np.zeros((b, n))
        np.add.at(weights, (np.repeat(np.arange(b), n), idx.ravel()), 1.0)
        # Macro over the classes present in the resample's ground truth, as in the unresampled metric.
        present = (weights @ np.eye(n_classes)[y_true]) > 0
        fa = per_class_f1(y_true, pred_a, n_classes, weights)
        fb = per_class_f1(y_true, pred_b, n_classes, weights)
        diffs.append(((fa - fb) * present).sum(1) / present.sum(1))
    diffs = np.concatenate(diffs)
    alpha = (1 - confidence) / 2
    observed = macro_f1(y_true, pred_a, n_classes) - macro_f1(y_true, pred_b, n_classes)
    return {"diff": float(observed), "low": float(np.quantile(diffs, alpha)), "high": float(np.quantile(diffs, 1 - alpha)),
            "n_boot": n_boot, "confidence": confidence}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    present = np.bincount(y_true, minlength=n_classes) > 0
    return float(per_class_f1(y_true, y_pred, n_classes)[present].mean())


def run_gate(
    y_true: np.ndarray, challenger_pred: np.ndarray, champion_pred: np.ndarray | None, labels: list[str],
    challenger_p95_ms: float, epsilon: float, delta: float, latency_budget_ms: float,
    n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> dict:
    """Decide whether the challenger replaces the champion; every check and its reason is in the result."""
    k = len(labels)
    checks: dict = {}
    reasons: list[str] = []
    latency_ok = challenger_p95_ms <= latency_budget_ms
    checks["latency"] = {"p95_ms": challenger_p95_ms, "budget_ms": latency_budget_ms, "passed": latency_ok}
    reasons.append(f"p95 latency {challenger_p95_ms:.1f} ms {'within' if latency_ok else 'over'} budget {latency_budget_ms} ms")
    checks["challenger_macro_f1"] = macro_f1(y_true, challenger_pred, k)
    if champion_pred is None:
        passed = latency_ok
        reasons.insert(0, "no champion: the first model is promoted if it meets the latency budget")
        return {"promoted": passed, "reasons": reasons, "checks": checks}

    boot = paired_bootstrap_macro_f1(y_true, challenger_pred, champion_pred, k, n_boot, confidence, seed)
    f1_ok = boot["low"] >= -epsilon
    checks["macro_f1"] = {**boot, "champion": macro_f1(y_true, champion_pred, k),
                          "challenger": checks["challenger_macro_f1"], "epsilon": epsilon, "passed": f1_ok}
    reasons.append(
        f"macro-F1 diff {boot['diff']:+.4f}, {int(confidence * 100)}% CI [{boot['low']:+.4f}, {boot['high']:+.4f}] "
        f"{'≥' if f1_ok else '<'} -ε ({-epsilon:+.4f})"
    )
    drops = per_class_f1(y_true, champion_pred, k) - per_class_f1(y_true, challenger_pred, k)
    present = np.bincount(y_true, minlength=k) > 0
    drops = np.where(present, drops, 0.0)
    worst = int(np.argmax(drops))
    per_class_ok = bool(drops[worst] <= delta)
    checks["per_intent_f1"] = {"max_drop": float(drops[worst]), "worst_intent": labels[worst], "delta": delta,
                               "drops_over_delta": {labels[i]: float(drops[i]) for i in np.flatnonzero(drops > delta)},
                               "passed": per_class_ok}
    reasons.append(f"largest per-intent F1 drop {drops[worst]:.4f} ({labels[worst]}) "
                   f"{'≤' if per_class_ok else '>'} δ ({delta})")
    return {"promoted": bool(f1_ok and per_class_ok and latency_ok), "reasons": reasons, "checks": checks}
