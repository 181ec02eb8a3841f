"""The split: official test kept whole, stratified seeded validation, no text in two splits."""

import pandas as pd
import pytest

from intentops.data.readers import match_key
from intentops.errors import UserError
from intentops.stages.split import run_split, stratified_holdout
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
    table = canonical(
        extra_train=[("WHEN WILL MY CARD ARRIVE?  ", "card_arrival")],
        extra_test=[("when will my card arrive?", "card_arrival")],
    )
    n_test = (table["origin_split"] == "test").sum()
    frames, stats = run_split(table, 0.2, 0.2, seed=1)
    keys = {s: set(f["text"].map(match_key)) for s, f in frames.items()}
    assert (
        not (keys["train"] & keys["val"])
        and not (keys["train"] & keys["test"])
        and not (keys["val"] & keys["test"])
    )
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


def feedback_rows(rows):
    return pd.DataFrame(
        [(t, lab, "feedback", f"labels.csv:{i + 2}") for i, (t, lab) in enumerate(rows)],
        columns=["text", "label", "origin_split", "source_id"],
    )


def test_feedback_joins_train_only_and_leaves_the_dataset_split_as_it_was():
    table = canonical()
    frames, _ = run_split(table, 0.2, 0.2, seed=5)
    fb = feedback_rows([(f"my pin is blocked again, case {i}", "pin_blocked") for i in range(10)])
    with_fb, stats = run_split(pd.concat([table, fb], ignore_index=True), 0.2, 0.2, seed=5)
    assert with_fb["val"].equals(frames["val"]) and with_fb["test"].equals(frames["test"])
    assert (with_fb["train"]["origin_split"] == "feedback").sum() == 10 == stats["feedback"]["in_train"]
    # A dataset without a test file: test is carved from the dataset's rows only, never from feedback.
    no_test = pd.concat([table[table["origin_split"] == "train"], fb], ignore_index=True)
    carved, _ = run_split(no_test, 0.2, 0.25, seed=3)
    assert not (carved["test"]["origin_split"] == "feedback").any()
    assert not (carved["val"]["origin_split"] == "feedback").any()


def test_holdout_intents_leave_train_and_val_but_not_test_or_feedback():
    table = canonical()
    fb = feedback_rows([("please unblock my pin, it is locked", "pin_blocked")])
    frames, stats = run_split(
        pd.concat([table, fb], ignore_index=True), 0.2, 0.2, seed=5, holdout_intents=["pin_blocked"]
    )
    assert set(frames["train"].loc[frames["train"]["label"] == "pin_blocked", "origin_split"]) == {"feedback"}
    assert "pin_blocked" not in set(frames["val"]["label"])
    assert (frames["test"]["label"] == "pin_blocked").sum() == (
        (table["origin_split"] == "test") & (table["label"] == "pin_blocked")
    ).sum()
    assert stats["holdout"]["intents"] == ["pin_blocked"] and stats["holdout"]["dropped_rows"] > 0
    with pytest.raises(UserError, match="holdout_intents"):
        run_split(table, 0.2, 0.2, seed=5, holdout_intents=["no_such_intent"])
