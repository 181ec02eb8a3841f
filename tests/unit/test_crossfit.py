"""Small data: when to cross-fit, the folds, the batch size, and the threshold's expected operating point."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from intentops.data.splits import fold_ids
from intentops.inference.ood import (
    choose_threshold,
    expected_operating_point,
    operating_point,
    support_warnings,
)
from intentops.training import crossfit_wanted, train_batch_size


def test_folds_are_stratified_balanced_and_seeded():
    labels = np.repeat(np.arange(7), [10, 10, 10, 3, 1, 25, 10])
    folds = fold_ids(labels, 5, seed=3)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for label in (0, 1, 2, 6):  # 10 rows in 5 folds: 2 each
        assert set(np.bincount(folds[labels == label], minlength=5)) == {2}
    assert (fold_ids(labels, 5, seed=3) == folds).all() and not (fold_ids(labels, 5, seed=4) == folds).all()


@pytest.mark.parametrize(
    "enabled, n_val, n_classes, wanted",
    [
        ("auto", 1000, 77, False),  # Banking77: 13 rows per intent
        ("auto", 3000, 150, False),  # CLINC150
        ("auto", 77, 77, True),  # 10-shot Banking77: 1 row per intent
        ("auto", 31, 20, True),  # a small chatbot export
        ("auto", 800, 200, True),  # enough rows, too few per intent
        (False, 31, 20, False),
        (True, 1000, 77, True),
    ],
)
def test_small_val_means_fewer_rows_or_fewer_rows_per_intent(enabled, n_val, n_classes, wanted):
    ccfg = OmegaConf.create({"enabled": enabled, "min_val_rows": 500, "min_val_rows_per_class": 5})
    decided, reason = crossfit_wanted(ccfg, n_val, n_classes)
    assert decided is wanted and f"{n_val} in-scope rows" in reason


def test_the_batch_shrinks_on_small_data_only():
    mcfg = OmegaConf.create({"batch_size": 256, "min_steps_per_epoch": 20})
    assert train_batch_size(mcfg, 9000) == 256  # Banking77: 35 steps an epoch already
    assert train_batch_size(mcfg, 693) == 34
    assert train_batch_size(mcfg, 100) == 16  # never below 16
    assert train_batch_size(OmegaConf.create({"batch_size": 256}), 693) == 256


def inputs(n_in: int, n_oos: int, seed: int) -> dict:
    """Scores where higher is more out-of-scope: in-scope N(0, 1), out-of-scope N(2.5, 1)."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(0, 1, n_in), rng.normal(2.5, 1, n_oos)])
    is_oos = np.r_[np.zeros(n_in, bool), np.ones(n_oos, bool)]
    return {"scores": scores, "is_oos": is_oos, "correct": ~is_oos, "flagged": None}


def fresh_figures(threshold: float) -> dict:
    """The threshold's coverage and recall on 200,000 new rows of the same distributions."""
    x = inputs(100_000, 100_000, seed=99)
    return operating_point(x["scores"], x["is_oos"], None, threshold, higher_is_ood=True)


@pytest.mark.parametrize(
    "target, figure", [({"coverage": 0.95}, "coverage"), ({"oos_recall": 0.6}, "oos_recall")]
)
def test_the_interval_covers_what_the_threshold_does_on_new_data(target, figure):
    """Over 100 samples of 80 in-scope and 40 out-of-scope rows, the 95 % interval holds the chosen threshold's
    figure on new data about 95 % of the time (measured: 0.95 for coverage, 0.92 for recall, 150 samples)."""
    hits = 0
    for s in range(100):
        x = inputs(80, 40, seed=1000 + s)
        got = expected_operating_point(x, True, target, n_boot=200, level=0.95, seed=s)
        threshold = choose_threshold(x["scores"], x["is_oos"], x["correct"], True, target)
        band = got["expected"][figure]
        hits += band["low"] <= fresh_figures(threshold)[figure] <= band["high"]
        assert got["in_sample"][figure] >= list(target.values())[0] and got["resamples"] == 200
    assert hits >= 85, hits


def test_many_rows_give_a_narrow_band_near_the_target():
    got = expected_operating_point(inputs(5000, 0, seed=2), True, {"coverage": 0.95}, n_boot=200, seed=0)
    band = got["expected"]["coverage"]
    assert band["high"] - band["low"] < 0.02 and abs(band["estimate"] - 0.95) < 0.01
    assert "oos_recall" not in got["expected"]
    assert support_warnings(got, {"coverage": 0.95}, 0.05, "chosen on val") == []


def test_too_few_rows_warn_with_the_interval_and_where():
    got = expected_operating_point(inputs(12, 0, seed=5), True, {"coverage": 0.95}, n_boot=300, seed=0)
    (warning,) = support_warnings(got, {"coverage": 0.95}, 0.05, "chosen on val")
    assert "coverage 0.95" in warning and "12 in-scope" in warning and "chosen on val" in warning
