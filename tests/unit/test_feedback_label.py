"""Labelling rules from docs/labeling-guidelines.md: answers, strict majority, adjudication, kappa."""

import pytest
from sklearn.metrics import cohen_kappa_score

from intentops.data.taxonomy import Taxonomy
from intentops.feedback.label import agreement, export_table, parse_answer, resolve

TAX = Taxonomy(("card_arrival", "card_delivery_estimate", "lost_or_stolen_card", "Refund_not_showing_up"))
SUGGESTIONS = ["card_arrival", "card_delivery_estimate"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("card_arrival", ("card_arrival", None)),
        ("Refund_not_showing_up  # irregular name kept", ("Refund_not_showing_up", "irregular name kept")),
        ("2", ("card_delivery_estimate", None)),
        ("", (None, None)),
        ("skip", (None, None)),
        ("unclear # needs the conversation", ("unclear", "needs the conversation")),
        ("out_of_scope # wants a mortgage", ("out_of_scope", "wants a mortgage")),
        ("new:crypto_wallet", ("new:crypto_wallet", None)),
    ],
)
def test_parse_answer(answer, expected):
    assert parse_answer(answer, TAX, SUGGESTIONS) == expected


@pytest.mark.parametrize(
    ("answer", "message"),
    [("3", "no suggestion 3"), ("card_arival", "not in the taxonomy"), ("new:Crypto Wallet", "snake_case")],
)
def test_parse_answer_rejects(answer, message):
    with pytest.raises(ValueError, match=message):
        parse_answer(answer, TAX, SUGGESTIONS)


def test_out_of_scope_maps_to_the_datasets_oos_label():
    clinc = Taxonomy(("balance",), oos_label="oos")
    assert parse_answer("out_of_scope", clinc, []) == ("oos", None)
    assert clinc.trainable("oos") and not TAX.trainable("out_of_scope") and not TAX.trainable("new:x")


@pytest.mark.parametrize(
    ("votes", "min_annotators", "adjudicated", "expected"),
    [
        (["a", "a"], 2, None, ("a", "majority")),
        (["a", "a", "b"], 3, None, ("a", "majority")),
        (["a", "b"], 2, None, (None, "needs_adjudication")),  # 1 of 2 is not a strict majority
        (["a", "b", "c"], 3, None, (None, "needs_adjudication")),
        (["a", "a", "unclear"], 3, None, (None, "needs_adjudication")),  # unclear always goes to adjudication
        (["a"], 2, None, (None, "pending")),
        (["a", "b"], 2, "b", ("b", "adjudicated")),
    ],
)
def test_resolve(votes, min_annotators, adjudicated, expected):
    assert resolve(votes, min_annotators, adjudicated) == expected


def test_agreement_matches_sklearn_and_handles_undefined_pairs():
    votes = {
        "p1": {"ann": "a", "bob": "a", "cy": "a"},
        "p2": {"ann": "b", "bob": "b"},
        "p3": {"ann": "a", "bob": "b"},
        "p4": {"ann": "c", "bob": "c"},
    }
    stats = agreement(votes)
    pairs = {tuple(p["annotators"]): p for p in stats["pairs"]}
    expected = cohen_kappa_score(["a", "b", "a", "c"], ["a", "b", "b", "c"])
    assert pairs[("ann", "bob")]["kappa"] == pytest.approx(expected)
    assert pairs[("ann", "cy")] == {"annotators": ["ann", "cy"], "items": 1, "kappa": None}
    assert stats["mean_kappa"] == pytest.approx(expected)
    assert stats["unanimous_share_by_label"] == {"a": 0.5, "b": 1.0, "c": 1.0}


def test_export_table_keeps_resolved_items_and_proposed_intents():
    items = [
        {"prediction_id": p, "text": f"text {p}", "model_version": "v1", "suggested_intent": "card_arrival"}
        for p in ("p1", "p2", "p3", "p4")
    ]
    votes = {
        "p1": {"a": "card_arrival", "b": "card_arrival"},
        "p2": {"a": "new:x", "b": "new:x"},
        "p3": {"a": "card_arrival"},
        "p4": {"a": "card_arrival", "b": "lost_or_stolen_card"},
    }
    adjudicated = {"p4": {"label": "lost_or_stolen_card", "adjudicator": "lead", "reason": "rule 2"}}
    table, status = export_table(items, votes, adjudicated, TAX, min_annotators=2, guideline_version="1")
    # The proposal keeps its new: prefix; ingest extends the taxonomy with it.
    assert table[["text", "label", "method"]].values.tolist() == [
        ["text p1", "card_arrival", "majority"],
        ["text p2", "new:x", "majority"],
        ["text p4", "lost_or_stolen_card", "adjudicated"],
    ]
    assert status == {"exported": 3, "proposals": 1, "pending": 1}
