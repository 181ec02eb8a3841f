"""Classification metrics shared by `baseline`, `train` and `evaluate` (plain numpy, no framework)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 as scikit-learn defines it: the mean F1 over the classes in `y_true` or `y_pred` (0 if undefined).

    The one definition: evaluation, the baseline and the promotion gate (whose bootstrap computes the same mean
    per resample, `stages.promote.paired_bootstrap_macro_f1`) all report this.
    """
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def classification_summary(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 as fractions."""
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_f1": macro_f1(y_true, y_pred)}


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by bin size."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds conf in (edges[i], edges[i+1]]; conf == 0 falls in the first bin.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_bins(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram (empty bins left out)."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            rows.append(
                {
                    "bin": round(float((edges[b] + edges[b + 1]) / 2), 4),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(correct[m].mean()),
                    "count": int(m.sum()),
                }
            )
    return rows
