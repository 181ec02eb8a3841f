"""Labelling rules from docs/labeling-guidelines.md: answers, strict majority, adjudication, kappa."""

import io

import pytest
from sklearn.metrics import cohen_kappa_score

from intentops.data.taxonomy import Taxonomy
from intentops.feedback import store
from intentops.feedback.label import (
    _stdin_reader,
    agreement,
    export_table,
    label_session,
    parse_answer,
    resolve,
)

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


def test_parse_answer_refuses_control_characters():
    with pytest.raises(
        ValueError, match=r"the answer holds a control character U\+001B \(ESC\) at position 0"
    ):
        parse_answer("\x1b[Acard_arrival", TAX, SUGGESTIONS)
    assert parse_answer("card_arrival\r", TAX, SUGGESTIONS) == ("card_arrival", None)  # CRLF piped input


def test_the_session_shows_store_text_escaped_never_raw(tmp_path):
    """A queue item whose text carries a terminal escape sequence and a bidi override, in a real SQLite store,
    labelled through the same piped reader `intentops label` uses; everything written is captured."""
    engine = store.make_engine(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.upgrade(engine)
    top_k = [
        {"intent": "card_arrival", "score": 0.45},
        {"intent": "card_delivery_estimate\x1b[8m", "score": 0.4},
    ]
    store.enqueue(
        engine,
        [
            {
                "prediction_id": "p1",
                "text": "\x1b[2J\x1b[31mmy card\u202e never came\r\nhelp",
                "model_version": "v1",
                "suggested_intent": "card_arrival",
                "top_k": top_k,
                "confidence": 0.45,
                "reason": "low_confidence",
            }
        ],
    )
    out = io.StringIO()
    answers = io.StringIO("card_arrival\x1b[2J # typed with an escape\n1 # first suggestion\n")
    counts = label_session(
        engine,
        "ann",
        TAX,
        min_annotators=2,
        show_top_k=2,
        read_line=_stdin_reader(answers, out),
        write=lambda line: out.write(line + "\n"),
    )
    engine.dispose()
    shown = out.getvalue()
    assert counts == {"shown": 1, "labelled": 1, "skipped": 0}
    assert "  text: \\x1b[2J\\x1b[31mmy card\\u202e never came\\r\\nhelp\n" in shown
    assert "2. card_delivery_estimate\\x1b[8m 0.40" in shown
    assert "card_arrival\\x1b[2J # typed with an escape" in shown  # the echo of the piped answer
    assert "! the answer holds a control character U+001B (ESC) at position 12" in shown
    assert all(c.isprintable() or c == "\n" for c in shown)  # nothing raw reached the terminal


def test_export_leaves_out_texts_that_ingest_would_refuse():
    items = [
        {"prediction_id": p, "text": text, "model_version": "v1", "suggested_intent": "card_arrival"}
        for p, text in (("p1", "where is my card"), ("p2", "stored before the rules\x00"))
    ]
    votes = {p: {"a": "card_arrival", "b": "card_arrival"} for p in ("p1", "p2")}
    table, status = export_table(items, votes, {}, TAX, min_annotators=2, guideline_version="1")
    assert table["prediction_id"].tolist() == ["p1"]
    assert status == {"exported": 1, "bad_text": 1}
