"""Accuracy of served traffic estimated without labels, from the profile windows (confidence-based estimation).

Why it works: the served confidence is calibrated (temperature scaling), so on traffic like the validation
split the mean top-1 confidence is the expected accuracy (the CBPE idea). Why that alone is not enough: on
intents the model never saw it is confidently wrong, so mean confidence hides most of the drop. What the model
does know is which rows its out-of-distribution detector flags. So the estimate splits the rows:

* rows NOT flagged out_of_distribution count with their calibrated confidence, plus the residual calibration
  bias of such rows measured on val (`offset` = their val accuracy minus their val mean confidence);
* flagged rows are a mix: in-distribution traffic is flagged at the val rate `ood_share` (those rows are right
  as often as flagged val rows were, `ood_accuracy`); the excess over that rate is novel traffic, which a
  classifier cannot get right (its intent is not among the outputs), so it counts as wrong. Only the excess
  beyond chance counts: the flag count of an in-distribution window varies (its own binomial draw, and the
  val rate is itself measured), and the first loop demo run showed a held-in test window flagged at 7.6 % against
  val's 5.0 % (test is class-balanced, val follows train's imbalance): counting all of that excess as novel put
  the estimate 3.2 points under the actual accuracy; beyond Z95 of the spread, 1.8.

Novel rows the detector misses still count with their (high) confidence: the estimate is an upper bound under
novel traffic. In a simulation on Banking77 test (5 intents removed from the outputs, 60 % of rows from them) the
estimate fell by 0.39-0.52 for an actual fall of 0.56-0.57, where mean confidence fell by only 0.22-0.27; on
in-distribution windows of 1,000+ rows it was within 0.018 of the actual accuracy, inside its interval.

The 95 % interval adds, as variances: the Bernoulli spread of the rows (sum of p(1-p), the CBPE variance), the
sampling error of the val measurements (offset, ood_accuracy) the estimate leans on, and the uncertainty of how
many flagged rows are novel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from intentops.monitor.features import OUT_OF_DISTRIBUTION

if TYPE_CHECKING:
    from whylogs.core import DatasetProfileView

Z95 = 1.959963984540054
METHOD_FLAGS = "confidence+ood_flags"
METHOD_CONFIDENCE = "mean_confidence"


@dataclass(frozen=True)
class WindowStats:
    """What the estimate needs from one profile: rows, rows flagged out_of_distribution, and the count, mean and
    sample variance of the other rows' confidences."""

    rows: int
    ood: int
    in_n: int
    in_mean: float
    in_var: float
    flags: bool = True  # False: the profile has no out-of-distribution flags; every row counts as in scope


def _distribution(view: DatasetProfileView, column: str) -> tuple[int, float, float] | None:
    col = view.get_column(column)
    metric = col.get_metric("distribution") if col is not None else None
    if metric is None or not metric.n:
        return None
    var = float(metric.variance) if metric.n > 1 else 0.0
    return int(metric.n), float(metric.mean.value), var if math.isfinite(var) else 0.0


def window_stats(view: DatasetProfileView, use_flags: bool = True) -> WindowStats | None:
    """The estimate's inputs read from a profile; None when it holds no `confidence` (profiles before predictions).

    With `use_flags` and a profile that has `in_scope_confidence`, flagged rows are counted apart; otherwise every
    row counts with its confidence (plain mean confidence: older windows, or a reference without val stats).
    """
    conf = _distribution(view, "confidence")
    if conf is None:
        return None
    rows = conf[0]
    in_scope = _distribution(view, "in_scope_confidence") if use_flags else None
    if use_flags and view.get_column("in_scope_confidence") is not None:
        n, mean, var = in_scope or (0, 0.0, 0.0)
        return WindowStats(rows, rows - n, n, mean, var)
    return WindowStats(rows, 0, rows, conf[1], conf[2], flags=False)


def reference_stats(
    confidence: Sequence[float], reasons: Sequence[str | None], correct: Sequence[bool]
) -> dict[str, Any]:
    """The val measurements the estimate leans on, from the model's outputs on val and the val labels.

    Returns:
        rows, accuracy (the labelled val accuracy), ood_rows, ood_share, ood_accuracy (of flagged rows),
        in_scope_rows, in_scope_accuracy, in_scope_confidence and offset (accuracy minus mean confidence of
        the rows not flagged out_of_distribution).
    """
    n = len(confidence)
    if n == 0 or not (n == len(reasons) == len(correct)):
        raise ValueError(
            f"need as many confidences, reasons and labels, got {n}, {len(reasons)}, {len(correct)}"
        )
    ood = [r == OUT_OF_DISTRIBUTION for r in reasons]
    n_ood = sum(ood)
    in_conf = [c for c, o in zip(confidence, ood, strict=True) if not o]
    in_correct = [bool(k) for k, o in zip(correct, ood, strict=True) if not o]
    ood_correct = sum(bool(k) for k, o in zip(correct, ood, strict=True) if o)
    in_acc = sum(in_correct) / len(in_correct) if in_correct else 0.0
    in_mean = sum(in_conf) / len(in_conf) if in_conf else 0.0
    return {
        "rows": n,
        "accuracy": sum(bool(k) for k in correct) / n,
        "ood_rows": n_ood,
        "ood_share": n_ood / n,
        "ood_accuracy": ood_correct / n_ood if n_ood else 0.0,
        "in_scope_rows": len(in_conf),
        "in_scope_accuracy": in_acc,
        "in_scope_confidence": in_mean,
        "offset": in_acc - in_mean,
    }


def estimate(stats: WindowStats, ref: Mapping[str, Any] | None) -> dict[str, Any]:
    """Estimated accuracy of one window (or merged windows) with its 95 % interval.

    Args:
        stats: from `window_stats`.
        ref: `reference_stats` of val; None gives plain mean confidence (no offset, flagged rows not split).

    Returns:
        estimated_accuracy, low, high, rows, ood_share, novel_share (flagged rows beyond the val rate), method.
    """
    n = stats.rows
    if n <= 0:
        raise ValueError("no rows to estimate the accuracy of")
    off = a = f = se_off = se_a = se_f = 0.0
    if ref is not None:
        off, a, f = float(ref["offset"]), float(ref["ood_accuracy"]), float(ref["ood_share"])
        n_in_ref, n_ood_ref, n_ref = int(ref["in_scope_rows"]), int(ref["ood_rows"]), int(ref["rows"])
        acc_in = float(ref["in_scope_accuracy"])
        se_off = math.sqrt(acc_in * (1 - acc_in) / max(n_in_ref, 1))
        se_a = math.sqrt(a * (1 - a) / max(n_ood_ref, 1))
        se_f = math.sqrt(f * (1 - f) / max(n_ref, 1))
    ood, in_n, mean = stats.ood, stats.in_n, stats.in_mean
    # Flagged rows an in-distribution window would show vary by chance (the window's own draw, and val's rate
    # is itself measured): only the excess beyond Z95 of that spread counts as novel intents.
    sd_flags = math.sqrt(n * f * (1 - f) + n * n * se_f * se_f)
    novel = 0.0
    if ref is not None and f < 1:
        novel = min(float(ood), max(0.0, (ood - f * n - Z95 * sd_flags) / (1 - f)))
    flagged_in = ood - novel
    in_sum = min(max(in_n * (mean + off), 0.0), float(in_n))
    value = (in_sum + flagged_in * a) / n
    # sum of p(1-p) over the in-scope rows, from their mean and sample variance
    sum_p2 = (in_n - 1) * stats.in_var + in_n * mean * mean if in_n else 0.0
    var = max(in_n * mean - sum_p2, 0.0) + flagged_in * a * (1 - a)
    var += (in_n * se_off) ** 2 + (flagged_in * se_a) ** 2
    if ref is not None and f < 1:  # how many flagged rows are novel is itself uncertain
        var += (a * sd_flags / (1 - f)) ** 2
    half = Z95 * math.sqrt(var) / n
    return {
        "estimated_accuracy": value,
        "low": max(0.0, value - half),
        "high": min(1.0, value + half),
        "rows": n,
        "ood_share": ood / n,
        "novel_share": novel / n,
        "method": METHOD_FLAGS if ref is not None and stats.flags else METHOD_CONFIDENCE,
    }


def estimate_view(view: DatasetProfileView, ref: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`estimate` of a profile, None when it holds no confidences."""
    stats = window_stats(view, use_flags=ref is not None)
    return None if stats is None or stats.rows == 0 else estimate(stats, ref)


def performance_report(
    reference: dict[str, Any],
    windows: list[dict[str, Any]],
    current: dict[str, Any],
    max_drop: float,
) -> dict[str, Any]:
    """The report's `performance` section: reference, per-window and current estimates, drop and trigger.

    Args:
        reference: {"estimated_accuracy", ...} of the reference profile.
        windows: per window: window info (window, start, end, rows, model_version, variant) and its estimate.
        current: the estimate of the merged windows.
        max_drop: `monitor.performance.max_drop`; the trigger fires when the drop is beyond it.
    """
    drop = float(reference["estimated_accuracy"]) - float(current["estimated_accuracy"])
    return {
        "reference": reference,
        "windows": windows,
        "current": current,
        "drop": drop,
        "max_drop": float(max_drop),
        "triggered": drop > float(max_drop),
        "per_intent": None,
    }


def render_performance(perf: Mapping[str, Any], png_path: Any) -> bytes:
    """Plot estimated accuracy per window (95 % band), labelled audit accuracy (with n), the reference and the
    max_drop line; write it as a PNG and return its bytes."""
    from matplotlib.figure import Figure

    from intentops.io import atomic_path

    windows = perf["windows"]
    x = list(range(len(windows)))
    est = [w["estimated_accuracy"] for w in windows]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.fill_between(
        x, [w["low"] for w in windows], [w["high"] for w in windows], alpha=0.25, label="95 % interval"
    )
    ax.plot(x, est, marker="o", label="estimated accuracy (no labels)")
    ref = float(perf["reference"]["estimated_accuracy"])
    ax.axhline(ref, color="tab:green", linestyle="--", label=f"reference {ref:.3f}")
    ax.axhline(ref - perf["max_drop"], color="tab:red", linestyle=":", label=f"max_drop {perf['max_drop']:g}")
    for i, w in enumerate(windows):
        lab = w.get("labelled") or {}
        if lab.get("accuracy") is not None:
            ax.errorbar(
                i,
                lab["accuracy"],
                yerr=[[lab["accuracy"] - lab["low"]], [lab["high"] - lab["accuracy"]]],
                fmt="s",
                color="black",
                label="labelled (audit sample)"
                if not ax.get_legend_handles_labels()[1].count("labelled (audit sample)")
                else None,
            )
            ax.annotate(
                f"n={lab['n']}", (i, lab["accuracy"]), fontsize=7, xytext=(4, -10), textcoords="offset points"
            )
    ax.set_xticks(x, [(w.get("start") or "")[5:16] for w in windows], rotation=30, fontsize=7)
    lows = [w["low"] for w in windows] + [(w.get("labelled") or {}).get("low") or 1.0 for w in windows]
    ax.set_ylim(max(0.0, min([*lows, ref - perf["max_drop"]]) - 0.05), 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title("Estimated accuracy per window (label-free) against the reference")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the plot, never over a point
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
        return tmp.read_bytes()
