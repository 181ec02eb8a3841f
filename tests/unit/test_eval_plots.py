"""The data behind `evaluate`'s plots: the row-normalised confusion matrix and its heatmap, and the confidence
histogram split into correct and wrong predictions."""

from __future__ import annotations

import io

import numpy as np

from intentops.stages.evaluate import (
    confidence_histogram,
    confusion_figure,
    normalised_confusion,
    per_class_report,
    run_evaluate,
)

LABELS = ["card_arrival", "card_linking", "exchange_rate", "top_up_failed"]


def predictions(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random labels over LABELS[:3] (the last intent has no rows) and predictions right ~70 % of the time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, len(LABELS), n))
    return y, pred


def test_normalised_confusion_rows_hold_where_each_intents_rows_went():
    y, pred = predictions()
    m = normalised_confusion(y, pred, len(LABELS))
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m[:3].sum(axis=1), 1.0)
    assert not m[3].any()  # an intent without test rows: a row of zeros, not NaN
    np.testing.assert_allclose(np.diag(m), per_class_report(y, pred, LABELS)["recall"])
    assert m[0, 1] == np.mean(pred[y == 0] == 1)


def test_run_evaluate_carries_the_normalised_matrix():
    y, pred = predictions(seed=1)
    proba = np.full((len(y), len(LABELS)), 0.1)
    proba[np.arange(len(y)), pred] = 0.7
    result = run_evaluate(proba, y, LABELS, ["a text"] * len(y))
    np.testing.assert_array_equal(result["confusion_normalised"], normalised_confusion(y, pred, len(LABELS)))


def test_confusion_figure_is_a_png_with_every_intent_and_the_given_title():
    y, pred = predictions()
    fig = confusion_figure(
        normalised_confusion(y, pred, len(LABELS)), LABELS, "rows normalised (test, hwu64)"
    )
    (ax, _colorbar) = fig.axes
    assert ax.get_title() == "rows normalised (test, hwu64)"
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=40)
    assert png.getvalue().startswith(b"\x89PNG")


def test_confidence_histogram_splits_every_bin_into_correct_and_wrong():
    confidence = [
        {"confidence": 0.0, "correct": False},
        {"confidence": 0.51, "correct": True},
        {"confidence": 0.52, "correct": False},
        {"confidence": 0.99, "correct": True},
        {"confidence": 1.0, "correct": True},
    ]
    rows = confidence_histogram(confidence, n_bins=10)
    assert len(rows) == 10 and rows[0]["bin"] == "0.00-0.10" and rows[-1]["bin"] == "0.90-1.00"
    assert all(r["correct"] + r["wrong"] == r["count"] for r in rows)
    assert sum(r["count"] for r in rows) == len(confidence)
    assert (rows[0]["correct"], rows[0]["wrong"]) == (0, 1)
    assert (rows[5]["correct"], rows[5]["wrong"]) == (1, 1)
    assert (rows[-1]["correct"], rows[-1]["wrong"]) == (2, 0)  # 1.0 falls in the last bin
