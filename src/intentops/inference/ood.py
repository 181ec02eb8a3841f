"""Calibration and out-of-scope scoring: pure numpy functions shared by `calibrate`, `evaluate` and serving.

The one call serving makes is `postprocess(logits, calibration, embeddings)`; `calibration` is what
`load_calibration` reads from models/calibration.json (+ its .npz of embedding statistics, if any).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from intentops.timing import progress

METHODS = ("msp", "energy", "mahalanobis", "knn")
# Scores where larger means "more out-of-scope"; msp is a confidence, so small means out-of-scope.
HIGHER_IS_OOD = {"msp": False, "energy": True, "mahalanobis": True, "knn": True}
EMBEDDING_METHODS = ("mahalanobis", "knn")
TARGETS = ("oos_recall", "in_scope_precision", "coverage")
REASONS = ("out_of_distribution", "low_confidence", "ambiguous")


# --- temperature scaling ---------------------------------------------------------------------------------
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64 then back to float32."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log-softmax of logits / temperature, float64, shape (n, k)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels `y` (n,) under softmax(logits / temperature)."""
    return float(-log_softmax(logits, temperature)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising validation NLL of softmax(logits / T) (Guo et al. 2017).

    A bounded 1-D search over log T: NLL has one parameter and is smooth, so no autograd is needed.
    """
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda log_t: nll(logits, y, math.exp(log_t)),
        method="bounded",
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        options={"xatol": 1e-4},
    )
    return float(math.exp(res.x))


# --- out-of-scope scores -----------------------------------------------------------------------------------
def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy −T·logsumexp(logits / T), shape (n,); higher means more out-of-scope (Liu et al. 2020)."""
    z = logits.astype(np.float64) / temperature
    m = z.max(axis=1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def fit_mahalanobis(embeddings: np.ndarray, y: np.ndarray, shrinkage: float = 0.1) -> dict[str, np.ndarray]:
    """Class means (k, d) and the shared precision matrix (d, d) of training embeddings.

    Args:
        shrinkage: weight of the scaled identity mixed into the covariance, which is near-singular for
            sentence embeddings (few hundred dims, some nearly constant).
    """
    x = embeddings.astype(np.float64)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(x)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    return {"means": means.astype(np.float32), "precision": np.linalg.inv(cov).astype(np.float32)}


def mahalanobis_score(embeddings: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean, shape (n,); higher means more out-of-scope."""
    x = embeddings.astype(np.float64)
    p = precision.astype(np.float64)
    mu = means.astype(np.float64)
    xp = x @ p
    # (x-mu)^T P (x-mu) = x^T P x - 2 x^T P mu + mu^T P mu, for every (row, class) pair at once: (n, k).
    d = (xp * x).sum(axis=1)[:, None] - 2 * xp @ mu.T + ((mu @ p) * mu).sum(axis=1)[None, :]
    return d.min(axis=1)


def knn_score(embeddings: np.ndarray, bank: np.ndarray, k: int = 10, batch: int = 2048) -> np.ndarray:
    """1 − cosine similarity to the k-th nearest training embedding, shape (n,); higher = more out-of-scope.

    Both inputs are L2-normalised sentence embeddings (the `embed` stage writes them so).
    """
    bank = bank.astype(np.float32)
    k = min(k, len(bank))
    out = np.empty(len(embeddings))
    for start in range(0, len(embeddings), batch):
        sims = embeddings[start : start + batch].astype(np.float32) @ bank.T
        out[start : start + batch] = 1.0 - np.partition(sims, -k, axis=1)[:, -k]
    return out


def ood_scores(
    logits: np.ndarray, ood: dict, temperature: float, embeddings: np.ndarray | None = None
) -> np.ndarray:
    """The configured method's score per row (n,); direction given by `HIGHER_IS_OOD[ood["method"]]`."""
    method = ood["method"]
    if method == "msp":
        return softmax(logits, temperature).max(axis=1).astype(np.float64)
    if method == "energy":
        return energy_score(logits, temperature)
    if embeddings is None:
        raise ValueError(f"OOD method {method!r} needs the sentence embeddings of the texts")
    stats = ood["stats"]
    if method == "mahalanobis":
        return mahalanobis_score(embeddings, stats["means"], stats["precision"])
    if method == "knn":
        return knn_score(embeddings, stats["bank"], int(ood.get("k", 10)))
    raise ValueError(f"unknown OOD method {method!r}; expected one of {METHODS}")


def is_ood(scores: np.ndarray, threshold: float, higher_is_ood: bool) -> np.ndarray:
    """(n,) bool: the score is on the out-of-scope side of the threshold (ties count as out-of-scope)."""
    return scores >= threshold if higher_is_ood else scores <= threshold


# --- threshold selection -----------------------------------------------------------------------------------
def choose_threshold(
    scores: np.ndarray,
    is_oos: np.ndarray,
    correct: np.ndarray,
    higher_is_ood: bool,
    target: dict[str, float],
    flagged: np.ndarray | None = None,
) -> float:
    """The least aggressive threshold that meets a single target on validation rows.

    Args:
        scores: OOD scores (n,).
        is_oos: (n,) bool, true for out-of-scope rows (may be all false).
        correct: (n,) bool, true where the classifier's top-1 is right (false on out-of-scope rows).
        target: one of {"oos_recall": r} (flag at least r of the out-of-scope rows),
            {"in_scope_precision": p} (accepted rows are right at least p of the time, keeping the most),
            {"coverage": c} (accept at least c of the in-scope rows).
        flagged: (n,) bool, rows flagged out-of-scope whatever their score (top-1 is a trained out-of-scope
            class); they count towards an oos_recall target, so the score only has to catch the rest.

    Returns:
        The threshold; a row is out-of-scope when `is_ood(score, threshold, higher_is_ood)`.
    """
    if len(target) != 1 or next(iter(target)) not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS} with a value, got {dict(target)}")
    ((name, value),) = target.items()
    # Work in "higher = more OOD" space; flagged = s >= t. Candidates are the observed scores.
    s = np.asarray(scores, dtype=np.float64) * (1 if higher_is_ood else -1)
    sign = 1 if higher_is_ood else -1
    if name == "oos_recall":
        if not is_oos.any():
            raise ValueError("target oos_recall needs out-of-scope rows in the validation data")
        pre = np.zeros(len(s), dtype=bool) if flagged is None else np.asarray(flagged, dtype=bool)
        oos = np.sort(s[is_oos & ~pre])[::-1]
        need = math.ceil(value * int(is_oos.sum()) - 1e-9) - int((is_oos & pre).sum())
        if need <= 0:  # the flagged rows alone meet the target: the score flags nothing more
            return float(sign * np.nextafter(s.max(), np.inf))
        return float(sign * oos[need - 1])
    if name == "coverage":
        ins = np.sort(s[~is_oos])
        keep = min(len(ins), math.ceil(value * len(ins) - 1e-9))
        # Flag everything above the keep-th smallest in-scope score.
        return float(sign * (np.nextafter(ins[keep - 1], np.inf) if keep else ins[0]))
    # in_scope_precision: accept rows with s < t; scan thresholds from the most permissive down.
    order = np.argsort(s, kind="stable")
    ok = np.cumsum(correct[order]) / np.arange(1, len(s) + 1)  # precision of the i+1 lowest-scored rows
    sorted_s = s[order]
    # A cut is valid only between distinct scores (ties are flagged together).
    last_of_run = np.r_[sorted_s[1:] != sorted_s[:-1], True]
    valid = np.flatnonzero((ok >= value) & last_of_run)
    if not len(valid):
        return float(sign * sorted_s[0])  # flag everything: no cut reaches the precision
    i = valid[-1]
    return float(sign * (np.nextafter(sorted_s[i], np.inf)))


def threshold_inputs(
    logits: np.ndarray,
    y: np.ndarray,
    ood: dict,
    temperature: float,
    oos_index: int | None = None,
    emb: np.ndarray | None = None,
) -> dict[str, np.ndarray | None]:
    """What `choose_threshold` reads, from raw logits: {"scores", "is_oos", "correct", "flagged"} (see there).

    With a trained out-of-scope class (`oos_index`), its top-1s are flagged whatever the score, and the score is
    computed over the other columns (as `postprocess` does).
    """
    is_oos = y < 0
    in_scope = logits if oos_index is None else np.delete(logits, oos_index, axis=1)
    pred = softmax(logits, temperature).argmax(axis=1)
    return {
        "scores": ood_scores(in_scope, ood, temperature, emb),
        "is_oos": is_oos,
        "correct": (pred == y) & ~is_oos,
        "flagged": pred == oos_index if oos_index is not None else None,
    }


def fit_threshold(
    val_logits: np.ndarray,
    val_y: np.ndarray,
    ood: dict,
    temperature: float,
    target: dict[str, float],
    oos_index: int | None = None,
    val_emb: np.ndarray | None = None,
) -> float:
    """The out-of-scope threshold that meets `target` on val under `temperature` (see `choose_threshold`).

    Args:
        val_logits: (n, k) raw logits; val_y: (n,) label ids, −1 for out-of-scope rows.
        ood: {"method", "higher_is_ood"[, "k", "stats"]}: the score to threshold.
        oos_index: the logit column of a trained out-of-scope class (see `threshold_inputs`).
        val_emb: (n, d) sentence embeddings, for "mahalanobis" and "knn".
    """
    x = threshold_inputs(val_logits, val_y, ood, temperature, oos_index, val_emb)
    return choose_threshold(
        x["scores"], x["is_oos"], x["correct"], ood["higher_is_ood"], target, x["flagged"]
    )


def operating_point(
    scores: np.ndarray, is_oos: np.ndarray, flagged: np.ndarray | None, threshold: float, higher_is_ood: bool
) -> dict[str, float]:
    """Coverage (in-scope rows accepted) and, with out-of-scope rows, their recall, at `threshold`."""
    out = is_ood(scores, threshold, higher_is_ood)
    if flagged is not None:
        out = out | flagged
    point = {"coverage": float((~out[~is_oos]).mean()) if (~is_oos).any() else float("nan")}
    if is_oos.any():
        point["oos_recall"] = float(out[is_oos].mean())
    return point


def _rows(x: dict, idx: np.ndarray) -> dict:
    """The rows `idx` (indices or a mask) of every array in a `threshold_inputs` record."""
    return {k: None if v is None else v[idx] for k, v in x.items()}


def _choose(x: dict, higher_is_ood: bool, target: dict[str, float]) -> float:
    return choose_threshold(x["scores"], x["is_oos"], x["correct"], higher_is_ood, target, x["flagged"])


def _point(x: dict, threshold: float, higher_is_ood: bool) -> dict[str, float]:
    return operating_point(x["scores"], x["is_oos"], x["flagged"], threshold, higher_is_ood)


def expected_operating_point(
    x: dict,
    higher_is_ood: bool,
    target: dict[str, float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    desc: str | None = None,
) -> dict:
    """The coverage (and recall) to expect on new data from choosing the threshold on rows `x`
    (`threshold_inputs`), with a bootstrap interval: on each resample (in-scope and out-of-scope rows resampled
    separately) the threshold is chosen again and measured on all of `x`, standing in for the population. The
    spread is that of the threshold's true coverage; a finite test set adds its own sampling noise. `desc` labels
    a progress bar over the resamples (`timing.progress`).

    Returns:
        {"in_sample": the chosen threshold's figures on `x`, "expected": {figure: {"estimate" (median), "low",
        "high"}}, "resamples", "level", "rows", "oos_rows"}
    """
    rng = np.random.default_rng(seed)
    groups = [g for g in (np.flatnonzero(~x["is_oos"]), np.flatnonzero(x["is_oos"])) if len(g)]
    draws = []
    for _ in progress(range(int(n_boot)), desc, unit="resample"):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        draws.append(_point(x, _choose(_rows(x, idx), higher_is_ood, target), higher_is_ood))
    q = ((1 - level) / 2, 0.5, 1 - (1 - level) / 2)
    expected = {}
    for key in draws[0] if draws else {}:
        low, mid, high = np.quantile([d[key] for d in draws], q)
        expected[key] = {"estimate": float(mid), "low": float(low), "high": float(high)}
    return {
        "in_sample": _point(x, _choose(x, higher_is_ood, target), higher_is_ood),
        "expected": expected,
        "resamples": len(draws),
        "level": level,
        "rows": int((~x["is_oos"]).sum()),
        "oos_rows": int(x["is_oos"].sum()),
    }


def support_warnings(expected: dict, target: dict[str, float], max_shortfall: float, where: str) -> list[str]:
    """Why the calibration rows cannot support the target: the lower end of the expected figure's interval is
    more than `max_shortfall` below it. Empty when they can (or the target is not a coverage or recall)."""
    ((name, value),) = target.items()
    figure = (expected.get("expected") or {}).get(name)
    if figure is None or figure["low"] >= value - max_shortfall:
        return []
    return [
        f"the out-of-scope threshold cannot be trusted to meet {name} {value:g}: on new data expect "
        f"{figure['estimate']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}] ({expected['level']:.0%} bootstrap "
        f"interval; {expected['rows']} in-scope and {expected['oos_rows']} out-of-scope calibration rows, {where}). "
        "More labelled rows (val, or train with train.crossfit), or a target these rows support, narrow it"
    ]


def refit_calibration(
    calibration: dict, val_logits: np.ndarray, val_y: np.ndarray, val_emb: np.ndarray | None = None
) -> dict:
    """The temperature and out-of-scope threshold of `calibration` fitted again, on another graph's val outputs.

    For a variant of the same model (the int8 graph): same method, target, statistics and review thresholds as
    the fp32 fit, so only what depends on the logits' scale moves. A temperature of exactly 1 was not fitted
    (`calibrate.fit_temperature=false`, or no `calibrate` stage) and stays 1; a threshold without a target was
    not fitted either and stays as it is.

    Args:
        calibration: `load_calibration(...)` of the fp32 graph (arrays under ood.stats for embedding methods).
        val_logits, val_y, val_emb: the variant's val logits (n, k), label ids (n,) (−1 out-of-scope) and,
            for embedding methods, its sentence embeddings (n, d).

    Returns:
        What was fitted, of {"temperature", "threshold"} ({} for nothing, or no val rows): what
        `variant_calibration` applies over `calibration`.
    """
    if not len(val_y):
        return {}
    out = {}
    temperature = float(calibration.get("temperature", 1.0))
    known = val_y >= 0
    if temperature != 1.0 and known.any():
        temperature = out["temperature"] = fit_temperature(val_logits[known], val_y[known])
    ood = calibration.get("ood") or {}
    if ood.get("method") and ood.get("target"):
        out["threshold"] = fit_threshold(
            val_logits, val_y, ood, temperature, ood["target"], calibration.get("oos_index"), val_emb
        )
    return out


def variant_calibration(calibration: dict, variant: str | None) -> dict:
    """`calibration` for one graph of the bundle: its "variants" entry's temperature and threshold (export fits
    them for the int8 graph) over the fp32 graph's; without an entry (fp32, older bundles), the fp32 one."""
    own = (calibration.get("variants") or {}).get(variant) or {} if variant else {}
    out = {k: v for k, v in calibration.items() if k != "variants"}
    if "temperature" in own:
        out["temperature"] = float(own["temperature"])
    if own.get("threshold") is not None and out.get("ood"):
        out["ood"] = {**out["ood"], "threshold": float(own["threshold"])}
    return out


# --- detection and selective-prediction metrics -------------------------------------------------------------
def detection_metrics(
    scores: np.ndarray, positive: np.ndarray, higher_is_positive: bool, tpr_level: float = 0.95
) -> dict[str, float]:
    """AUROC and FPR at `tpr_level` TPR of a detector; the positives are the rows to catch (e.g. OOS)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    s = scores if higher_is_positive else -np.asarray(scores)
    fpr, tpr, _ = roc_curve(positive, s)
    return {
        "auroc": float(roc_auc_score(positive, s)),
        f"fpr_at_{round(tpr_level * 100)}_tpr": float(fpr[np.searchsorted(tpr, tpr_level, side="left")]),
    }


def detection_score(out: dict, higher_is_ood: bool, oos_index: int | None = None) -> np.ndarray:
    """The score AUROC and the ROC should rank by: `postprocess`'s `ood_score`, except that rows flagged by a
    trained out-of-scope class (top-1 == `oos_index`) rank as the most out-of-scope, whatever their score --
    they are flagged at every threshold. Without a trained class, the score itself."""
    score = np.asarray(out["ood_score"], dtype=np.float64)
    if oos_index is None or not len(score):
        return score
    by_class = np.asarray(out["pred"]) == int(oos_index)
    finite = score[np.isfinite(score)]
    edge = (finite.max() + 1.0 if higher_is_ood else finite.min() - 1.0) if len(finite) else 0.0
    return np.where(by_class, edge, score)


def roc_points(
    scores: np.ndarray, positive: np.ndarray, higher_is_positive: bool, n: int = 101
) -> list[dict]:
    """The ROC curve thinned to about `n` points (fpr, tpr) for a DVC plot."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(
        positive, scores if higher_is_positive else -np.asarray(scores), drop_intermediate=True
    )
    idx = np.unique(np.linspace(0, len(fpr) - 1, min(n, len(fpr))).round().astype(int))
    return [{"fpr": round(float(fpr[i]), 5), "tpr": round(float(tpr[i]), 5)} for i in idx]


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, n: int = 101) -> tuple[list[dict], float]:
    """Selective risk vs coverage when abstaining on the least confident rows, and its area (AURC).

    Returns:
        ([{"coverage", "risk"}] at about `n` coverages, area under the risk-coverage curve)
    """
    order = np.argsort(-np.asarray(confidence), kind="stable")
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    counts = np.arange(1, len(order) + 1)
    risk = errors / counts
    idx = np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))
    points = [
        {"coverage": round(float(counts[i] / len(order)), 5), "risk": round(float(risk[i]), 5)} for i in idx
    ]
    return points, float(risk.mean())


# --- operating-point metrics --------------------------------------------------------------------------------
def split_metrics(
    out: dict,
    y: np.ndarray,
    is_oos: np.ndarray,
    higher_is_ood: bool,
    n_bins: int,
    oos_index: int | None = None,
) -> dict:
    """What one split reports once postprocessed: accuracy with rejections, OOS recall, detection metrics.

    `oos_auroc`/`oos_fpr_at_95_tpr` rank rows as deployed (`ood.detection_score`: a top-1 on a trained
    out-of-scope class counts as most out-of-scope); with such a class, `oos_score_only_*` are the score's own.
    """
    ins = ~is_oos
    pred_ok = (out["pred"] == y) & ins
    accepted_ok = pred_ok & ~out["out_of_scope"]
    m = {
        "n_in_scope": int(ins.sum()),
        "n_oos": int(is_oos.sum()),
        "accuracy": float(pred_ok[ins].mean()),
        # In-scope rows flagged out-of-scope count as errors (as in Larson et al. 2019).
        "in_scope_accuracy": float(accepted_ok[ins].mean()),
        "coverage": float((~out["out_of_scope"][ins]).mean()),
        "needs_review_rate": float(out["needs_review"][ins].mean()),
        "ece": _ece(out["proba"][ins], y[ins], n_bins),
    }
    accepted = ~out["out_of_scope"]
    if accepted.any():
        m["in_scope_precision"] = float(accepted_ok[accepted].mean())
    if is_oos.any():
        m["oos_recall"] = float(out["out_of_scope"][is_oos].mean())
        score = detection_score(out, higher_is_ood, oos_index)
        m.update({f"oos_{k}": v for k, v in detection_metrics(score, is_oos, higher_is_ood).items()})
        if oos_index is not None:
            m.update(
                {
                    f"oos_score_only_{k}": v
                    for k, v in detection_metrics(out["ood_score"], is_oos, higher_is_ood).items()
                }
            )
    return m


# --- serving -----------------------------------------------------------------------------------------------
def postprocess(
    logits: np.ndarray, calibration: dict, embeddings: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Calibrated probabilities, out-of-scope flags and review flags from raw logits.

    Args:
        logits: (n, k) raw model outputs, columns in the bundle's label order.
        calibration: `load_calibration(...)`: {"temperature", "ood": {"method", "threshold", "higher_is_ood",
            ["stats"]}, "review": {"min_confidence", "min_margin"}, "oos_label", ["oos_index"]}. `oos_index`
            is the column of a trained out-of-scope class (CLINC150 with split.oos_as_class): a row whose
            top-1 is that class is out-of-scope, and the score is computed over the other (in-scope) columns.
        embeddings: (n, d) L2-normalised sentence embeddings; needed only by "mahalanobis" and "knn".

    Returns:
        {"proba" (n, k) float32, "pred" (n,) top-1 index, "confidence" (n,), "margin" (n,) top1 − top2,
         "ood_score" (n,), "out_of_scope" (n,) bool (out-of-distribution only, a trained out-of-scope class's
         top-1 included), "needs_review" (n,) bool (out-of-scope, low confidence or ambiguous: any reason),
         "reason" (n,) object: None, "out_of_distribution", "low_confidence" or "ambiguous" (first that applies)}
    """
    logits = np.asarray(logits)
    temperature = float(calibration.get("temperature", 1.0))
    proba = softmax(logits, temperature)
    top2 = -np.sort(-proba, axis=1)[:, :2]
    confidence = top2[:, 0]
    margin = confidence - (top2[:, 1] if proba.shape[1] > 1 else 0.0)
    pred = proba.argmax(axis=1)
    oos_index = calibration.get("oos_index")
    in_scope_logits = logits if oos_index is None else np.delete(logits, int(oos_index), axis=1)
    ood = calibration.get("ood") or {}
    if ood.get("method") and ood.get("threshold") is not None:
        score = ood_scores(in_scope_logits, ood, temperature, embeddings)
        out_of_scope = is_ood(
            score, float(ood["threshold"]), bool(ood.get("higher_is_ood", HIGHER_IS_OOD[ood["method"]]))
        )
    else:
        score, out_of_scope = np.full(len(logits), np.nan), np.zeros(len(logits), dtype=bool)
    if oos_index is not None:
        out_of_scope = out_of_scope | (pred == int(oos_index))
    review = calibration.get("review") or {}
    low = confidence < float(review.get("min_confidence", 0.0))
    ambiguous = margin < float(review.get("min_margin", 0.0))
    reason = np.full(len(logits), None, dtype=object)
    # Assign in reverse priority so the most important reason wins.
    reason[ambiguous] = "ambiguous"
    reason[low] = "low_confidence"
    reason[out_of_scope] = "out_of_distribution"
    return {
        "proba": proba,
        "pred": pred,
        "confidence": confidence,
        "margin": margin,
        "ood_score": score,
        "out_of_scope": out_of_scope,
        "needs_review": out_of_scope | low | ambiguous,  # exactly the rows with a reason
        "reason": reason,
    }


def normalize_calibration(raw: dict) -> dict:
    """A calibration record in `postprocess`'s shape.

    Bundles exported before the `calibrate` stage kept min_confidence/min_margin at the top level and had
    no out-of-scope method; those keys move under "review" and "ood" stays empty.
    """
    out = {k: v for k, v in raw.items() if k not in ("min_confidence", "min_margin")}
    legacy = {k: raw[k] for k in ("min_confidence", "min_margin") if k in raw}
    if legacy and "review" not in raw:
        out["review"] = legacy
    out.setdefault("ood", {})
    return out


def load_calibration(path: str | os.PathLike) -> dict:
    """Read calibration.json and, for embedding methods, its statistics (.npz named in "ood.stats_file")."""
    path = Path(path)
    calibration = normalize_calibration(json.loads(path.read_text(encoding="utf-8")))
    ood = calibration["ood"]
    if ood.get("method") in EMBEDDING_METHODS:
        with np.load(path.parent / ood["stats_file"]) as npz:
            ood["stats"] = {k: npz[k] for k in npz.files}
    return calibration


def _ece(proba: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    # Imported here: intentops.metrics imports scikit-learn's metrics (~2 s), which serving never needs.
    from intentops.metrics import expected_calibration_error

    return expected_calibration_error(proba, y, n_bins)
