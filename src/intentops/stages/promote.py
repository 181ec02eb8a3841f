"""Stage `promote`: the champion/challenger gate, then the registry update.

The challenger is promoted only if all three hold:
  1. macro-F1 is no worse than the champion's by more than `epsilon`: the lower end of a paired bootstrap
     confidence interval of (challenger - champion) macro-F1 on the same test set is >= -epsilon;
  2. no intent's F1 drops by more than `delta`;
  3. p95 single-request latency is within `latency_budget_ms`.
With no champion, the first model is promoted (checks 1 and 2 have nothing to compare against).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from intentops.config import check_stage_args
from intentops.errors import UserError, cli_entry
from intentops.metrics import macro_f1
from intentops.models.labels import label_ids
from intentops.timing import latency_ms, progress

log = logging.getLogger(__name__)


def per_class_f1(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
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
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_classes: int,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of macro-F1(a) - macro-F1(b): the same resampled rows score both models.

    Returns:
        {"diff": observed difference, "low": CI lower end, "high": CI upper end, "n_boot": ..., "confidence": ...}
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    diffs = []
    with progress(total=n_boot, desc="promote: paired bootstrap", unit="resample") as bar:
        for start in range(0, n_boot, 200):  # chunks keep the (B, n) weight matrix small
            b = min(200, n_boot - start)
            idx = rng.integers(0, n, size=(b, n))
            weights = np.zeros((b, n))
            np.add.at(weights, (np.repeat(np.arange(b), n), idx.ravel()), 1.0)
            diffs.append(
                weighted_macro_f1(y_true, pred_a, n_classes, weights)
                - weighted_macro_f1(y_true, pred_b, n_classes, weights)
            )
            bar.update(b)
    diffs = np.concatenate(diffs)
    alpha = (1 - confidence) / 2
    observed = macro_f1(y_true, pred_a) - macro_f1(y_true, pred_b)
    return {
        "diff": float(observed),
        "low": float(np.quantile(diffs, alpha)),
        "high": float(np.quantile(diffs, 1 - alpha)),
        "n_boot": n_boot,
        "confidence": confidence,
    }


def weighted_macro_f1(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray
) -> np.ndarray:
    """`metrics.macro_f1` of each of B resamples given as row weights (B, n): the mean F1 over the classes that
    occur in the resample's labels or predictions, as scikit-learn averages them. Returns (B,)."""
    f1 = per_class_f1(y_true, y_pred, n_classes, weights)
    present = (weights @ (np.eye(n_classes)[y_true] + np.eye(n_classes)[y_pred])) > 0
    return (f1 * present).sum(1) / present.sum(1)


def run_gate(
    y_true: np.ndarray,
    challenger_pred: np.ndarray,
    champion_pred: np.ndarray | None,
    labels: list[str],
    challenger_p95_ms: float,
    epsilon: float,
    delta: float,
    latency_budget_ms: float,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Decide whether the challenger replaces the champion; every check and its reason is in the result."""
    k = len(labels)
    checks: dict = {}
    reasons: list[str] = []
    latency_ok = challenger_p95_ms <= latency_budget_ms
    checks["latency"] = {"p95_ms": challenger_p95_ms, "budget_ms": latency_budget_ms, "passed": latency_ok}
    reasons.append(
        f"p95 latency {challenger_p95_ms:.1f} ms {'within' if latency_ok else 'over'} budget {latency_budget_ms} ms"
    )
    checks["challenger_macro_f1"] = macro_f1(y_true, challenger_pred)
    if champion_pred is None:
        passed = latency_ok
        reasons.insert(0, "no champion: the first model is promoted if it meets the latency budget")
        return {"promoted": passed, "reasons": reasons, "checks": checks}

    boot = paired_bootstrap_macro_f1(y_true, challenger_pred, champion_pred, k, n_boot, confidence, seed)
    f1_ok = boot["low"] >= -epsilon
    checks["macro_f1"] = {
        **boot,
        "champion": macro_f1(y_true, champion_pred),
        "challenger": checks["challenger_macro_f1"],
        "epsilon": epsilon,
        "passed": f1_ok,
    }
    reasons.append(
        f"macro-F1 diff {boot['diff']:+.4f}, {int(confidence * 100)}% CI [{boot['low']:+.4f}, {boot['high']:+.4f}] "
        f"{'≥' if f1_ok else '<'} -ε ({-epsilon:+.4f})"
    )
    drops = per_class_f1(y_true, champion_pred, k) - per_class_f1(y_true, challenger_pred, k)
    present = np.bincount(y_true, minlength=k) > 0
    drops = np.where(present, drops, 0.0)
    worst = int(np.argmax(drops))
    per_class_ok = bool(drops[worst] <= delta)
    checks["per_intent_f1"] = {
        "max_drop": float(drops[worst]),
        "worst_intent": labels[worst],
        "delta": delta,
        "drops_over_delta": {labels[i]: float(drops[i]) for i in np.flatnonzero(drops > delta)},
        "passed": per_class_ok,
    }
    reasons.append(
        f"largest per-intent F1 drop {drops[worst]:.4f} ({labels[worst]}) "
        f"{'≤' if per_class_ok else '>'} δ ({delta})"
    )
    return {"promoted": bool(f1_ok and per_class_ok and latency_ok), "reasons": reasons, "checks": checks}


def predicted_intents(predictor, texts: list[str]) -> np.ndarray:
    """Top-1 intent names for `texts` through the Predictor."""
    proba = predictor.predict_proba(texts)
    return np.asarray(predictor.labels, dtype=object)[proba.argmax(1)]


def run_promote(
    challenger,
    champion,
    texts: list[str],
    y_true: np.ndarray,
    gate: dict,
    latency_calls: int = 200,
    warmup_calls: int = 20,
) -> dict:
    """Score challenger and champion on the same texts through their Predictors, time the challenger, gate.

    Args:
        y_true: label ids in `challenger.labels` order.
        gate: run_gate's keyword arguments epsilon, delta, latency_budget_ms, n_boot, confidence, seed.

    Returns:
        gate.json: {"promoted", "reasons", "checks", "challenger", "champion"}.
    """
    labels = list(challenger.labels)
    # Champion intents the challenger does not know score as an extra, always-wrong class.
    space = labels + ["<not a challenger label>"]
    challenger_pred = label_ids(predicted_intents(challenger, texts), labels, unknown=len(labels))
    champion_pred = (
        None
        if champion is None
        else label_ids(predicted_intents(champion, texts), labels, unknown=len(labels))
    )
    latency = latency_ms(
        lambda text: challenger.predict([text]), texts, latency_calls, warmup_calls, "promote: latency"
    )
    result = run_gate(y_true, challenger_pred, champion_pred, space, latency["p95_ms"], **gate)
    result["checks"]["latency"].update(p50_ms=latency["p50_ms"], calls=latency["calls"])
    result["checks"]["n_test"] = int(len(y_true))
    return {
        "promoted": result["promoted"],
        "reasons": result["reasons"],
        "checks": result["checks"],
        "challenger": getattr(challenger, "version", None),
        "champion": None if champion is None else getattr(champion, "version", None),
    }


TARGET_ENV = "INTENTOPS_PROMOTE_TARGET"
TARGETS = ("production", "candidate")


def promote_target(pcfg) -> str:
    """Where a promoted challenger goes: `production`, or `candidate` (CI: the merge of its pull request moves
    production); $INTENTOPS_PROMOTE_TARGET overrides promote.target."""
    target = os.environ.get(TARGET_ENV) or pcfg.get("target", "production")
    if target not in TARGETS:
        raise UserError(
            f"promote.target must be one of {TARGETS}, got {target!r}",
            where=f"${TARGET_ENV} or promote.target in params.yaml",
            fix="production (move the pointer now) or candidate (stage it for the deploy workflow)",
        )
    return target


def update_registry(registry, state, bundle_dir: str, result: dict, target: str) -> str:
    """Upload a promoted challenger, then move production to it (or stage it as the candidate).

    The move is conditional on the registry not having changed since `state` was read for the gate
    (RegistryConflict otherwise). Returns what happened: production, candidate, unchanged or rejected.
    """
    version = result["challenger"]
    if not result["promoted"]:
        return "rejected"
    registry.add(bundle_dir, version)  # also refreshes a copy an older export left without a manifest
    if version == state.production:
        result["reasons"].append(f"{version} is already in production: pointer unchanged")
        return "unchanged"
    reason = "; ".join(result["reasons"])
    macro = result["checks"]["challenger_macro_f1"]
    if target == "candidate":
        registry.record("candidate", version, reason, after=state.seq, macro_f1=macro)
        result["reasons"].append(f"staged {version} as the candidate: merging its pull request promotes it")
    else:
        registry.set_production(version, "promote", reason, after=state.seq, macro_f1=macro)
    return target


@cli_entry
def main() -> None:
    import time

    import pandas as pd

    from intentops.config import load_params
    from intentops.inference.predictor import Predictor
    from intentops.inference.registry import Registry, registry_url
    from intentops.io import write_metrics
    from intentops.models.labels import encode_labels

    cfg = load_params()
    paths, pcfg = cfg.paths, cfg.promote
    t0 = time.perf_counter()
    target = promote_target(pcfg)
    challenger = Predictor.load(paths.bundle_dir)
    version = challenger.version
    if not version:
        raise UserError(
            "the challenger bundle has no version",
            where=f"{paths.bundle_dir}/bundle.json",
            fix="re-run `dvc repro export`: promote takes the ONNX bundle that export writes",
        )
    registry = Registry.at(registry_url(paths.registry_dir))
    state = registry.state()
    champion_version = state.production
    champion = None if champion_version is None else Predictor.load(registry.fetch(champion_version))
    test, y, _ = encode_labels(pd.read_parquet(paths.test), challenger.labels)
    gate = {k: pcfg[k] for k in ("epsilon", "delta", "latency_budget_ms", "n_boot", "confidence", "seed")}
    result = run_promote(
        challenger, champion, test["text"].tolist(), y, gate, int(pcfg.latency_calls), int(pcfg.warmup_calls)
    )
    result["target"] = update_registry(registry, state, paths.bundle_dir, result, target)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_metrics(paths.promote_gate, result, paths.run_facts_dir, ("seconds",))
    log.info(
        "promote %s vs %s: %s (%s)",
        version,
        champion_version or "no champion",
        "PROMOTED" if result["promoted"] else "rejected",
        "; ".join(result["reasons"]),
    )


if __name__ == "__main__":
    check_stage_args("promote", __doc__)  # --help, or exit 2 on any argument
    main()
