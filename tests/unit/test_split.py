"""The split: official test kept whole, stratified seeded validation, no text in two splits."""

import pandas as pd
import pytest

from intentops.data.readers import match_key
from intentops.errors import UserError
from intentops.split import run_split, stratified_holdout
from support import fixture_rows


def canonical(extra_train=(), extra_test=()):
    train, test = fixture_rows()
    rows = [(t, lab, "train", f"train.csv:{i}") for i, (t, lab) in enumerate([*train, *extra_train])]
    rows += [(t, lab, "test", f"test.csv:{i}") for i, (t, lab) in enumerate([*test, *extra_test])]
    return pd.DataFrame(rows, columns=["text", "label", "origin_split", "source_id"])


def test_official_test_is_kept_and_val_is_stratified_and_seeded():
    table = canonical()
    frames, stats = run_split(table, val_fraction=0.2, test_fraction=0.2, seed=7)
    assert len(frames["test"]) == (table["origin_split"] == "test").sum()
    per_class = frames["val"]["label"].value_counts()
    assert set(per_class.index) == set(table["label"]) and per_class.min() >= 2
    again, _ = run_split(table, val_fraction=0.2, test_fraction=0.2, seed=7)
    assert frames["val"]["source_id"].tolist() == again["val"]["source_id"].tolist()
    other, _ = run_split(table, val_fraction=0.2, test_fraction=0.2, seed=8)
    assert frames["val"]["source_id"].tolist() != other["val"]["source_id"].tolist()
    assert stats["rows"] == {k: len(v) for k, v in frames.items()}


def test_no_normalised_text_in_two_splits_and_test_never_thinned():
    # A test text repeated in train with other casing, and a repeated test text: train loses its copy, test keeps both.
    table = canonical(extra_train=[("WHEN WILL MY CARD ARRIVE?  ", "card_arrival")],
                      extra_test=[("when will my card arrive?", "card_arrival")])
    n_test = (table["origin_split"] == "test").sum()
    frames, stats = run_split(table, 0.2, 0.2, seed=1)
    keys = {s: set(f["text"].map(match_key)) for s, f in frames.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert len(frames["test"]) == n_test
    assert stats["dropped_cross_split_repeats"] >= 1


def test_csv_without_test_gets_a_carved_test_split():
    table = canonical()
    table = table[table["origin_split"] == "train"]
    frames, stats = run_split(table, 0.2, 0.25, seed=3)
    assert stats["test_carved_fraction"] == 0.25
    assert set(frames["test"]["label"]) == set(table["label"])
    assert sum(len(f) for f in frames.values()) == len(table)


def test_holdout_leaves_singletons_in_train_and_bad_fraction_is_rejected():
    df = pd.DataFrame({"label": ["a", "b", "b", "b"]})
    mask = stratified_holdout(df, 0.5, seed=0)
    assert not mask.iloc[0] and mask.iloc[1:].sum() == 2
    with pytest.raises(UserError, match="fractions"):
        run_split(canonical(), val_fraction=1.5, test_fraction=0.2, seed=0)
