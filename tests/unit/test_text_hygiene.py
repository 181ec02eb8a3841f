"""What a text may contain (intentops.data.text): the rules, the terminal view, and how the API applies them."""

import json
import unicodedata

import pytest
from pydantic import ValidationError

from intentops.api.schemas import (
    FeedbackRequest,
    PredictRequest,
    RequestError,
    request_texts,
    validation_error_body,
)
from intentops.data.text import display_text, text_problem


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("card\x00lost", "control character U+0000 (NUL) at position 4"),
        ("\x1b[31mred", "control character U+001B (ESC) at position 0"),
        ("del\x7f", "control character U+007F (DEL) at position 3"),
        ("next\x85line", "control character U+0085 (NEL) at position 4"),  # C1, and \s to the normaliser
        ("csi \x9b", "control character U+009B at position 4"),
        ("page\x0cbreak", "control character U+000C (form feed) at position 4"),
        ("card \ud800 lost", "lone surrogate U+D800 at position 5"),
        ("\udfff", "lone surrogate U+DFFF at position 0"),
        ("swapped \ufffe bom", "noncharacter U+FFFE at position 8"),
        ("ok\x1b then \x00", "control character U+001B (ESC) at position 2"),  # the first bad one
    ],
)
def test_refused_with_character_and_position(text, problem):
    assert text_problem(text) == problem


@pytest.mark.parametrize(
    "text",
    [
        "my card has not arrived",
        "tab\tseparated",
        "line one\r\nline two\n",  # CRLF from clients and CSVs
        "top\u00a0up failed",  # NBSP: Banking77 has them
        "\U0001f469\u200d\U0001f4bb where is my card",  # emoji ZWJ sequence
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with a ZWNJ
        "\u05d0\u05d9\u05e4\u05d4 \u05d4\u05db\u05e8\u05d8\u05d9\u05e1 \u05e9\u05dc\u05d9",  # Hebrew (RTL)
        "\u200fmixed \u202bbidi\u202c marks, soft\u00adhyphen, inner\ufeffbom",  # format characters (Cf)
        "",  # emptiness is the caller's rule (request_texts answers "empty text")
    ],
)
def test_accepted(text):
    assert text_problem(text) is None


def test_a_real_json_body_with_an_escaped_surrogate_is_caught():
    text = json.loads('{"text": "card \\ud800 lost"}')["text"]
    assert text_problem(text) == "lone surrogate U+D800 at position 5"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("pay \u202eevil", "pay \\u202eevil"),  # a bidi override would reorder the terminal line
        ("nul\x00", "nul\\x00"),
        ("one\r\ntwo\tthree", "one\\r\\ntwo\\tthree"),  # one item stays one line
        ("card \ud800 lost", "card \\ud800 lost"),  # would not even encode to UTF-8 raw
        ("\U0001f469\u200d\U0001f4bb", "\U0001f469\\u200d\U0001f4bb"),
        ("private \U000f0000", "private \\U000f0000"),
        ("top\u00a0up", "top\u00a0up"),  # spaces stay: a terminal shows them as blanks
        ("plain text, 20.50 \u00a3", "plain text, 20.50 \u00a3"),
    ],
)
def test_display_text_escapes_what_a_terminal_would_not_print(text, shown):
    out = display_text(text)
    assert out == shown
    assert all(c.isprintable() or unicodedata.category(c) == "Zs" for c in out)
    out.encode("utf-8")  # safe to write to a UTF-8 terminal


def predict(body: dict, max_texts: int = 8, max_chars: int = 20) -> list[str]:
    return request_texts(PredictRequest(**body), max_texts, max_chars)


def refused(body: dict, **limits) -> RequestError:
    with pytest.raises(RequestError) as err:
        predict(body, **limits)
    json.dumps(err.value.body(), ensure_ascii=False).encode("utf-8")  # what the JSON response does
    return err.value


def test_clean_texts_pass_through():
    assert predict({"text": "where is my card"}) == ["where is my card"]
    assert predict({"texts": ["a\r\nb", "top\u00a0up"]}) == ["a\r\nb", "top\u00a0up"]


def test_every_bad_item_is_named_in_one_422():
    err = refused({"texts": ["fine", "a\x00b", "  ", "ok", "c\x1b[2J", "\ud800"]})
    assert err.status == 422
    assert err.where == "request body: texts[1], texts[2], texts[4], texts[5]"
    assert (
        err.what == "4 of 6 texts refused; the first, texts[1]: control character U+0000 (NUL) at position 1"
    )
    assert err.body()["problems"] == [
        {"index": 1, "error": "control character U+0000 (NUL) at position 1"},
        {"index": 2, "error": "empty text"},
        {"index": 4, "error": "control character U+001B (ESC) at position 1"},
        {"index": 5, "error": "lone surrogate U+D800 at position 0"},
    ]
    assert "control characters" in err.fix


def test_one_text_and_blank_text():
    err = refused({"text": "card \ud800 lost"})
    assert (err.status, err.what, err.where) == (
        422,
        "lone surrogate U+D800 at position 5",
        "request body: text",
    )
    assert err.body()["problems"] == [{"index": 0, "error": "lone surrogate U+D800 at position 5"}]
    blank = refused({"text": " \t\r\n"})
    assert (blank.status, blank.what, blank.fix) == (422, "empty text", "send the customer's message")
    one = refused({"texts": ["ok", ""]})
    assert (one.what, one.where) == ("1 of 2 texts refused: texts[1]: empty text", "request body: texts[1]")


def test_413_wins_over_content_problems():
    too_long = refused({"texts": ["a\x00b", "", "x" * 21]})  # the long text comes after the bad ones
    assert (too_long.status, too_long.where) == (413, "request body: texts[2]")
    assert "problems" not in too_long.body()
    assert set(too_long.body()) == {"error", "where", "fix"}
    too_many = refused({"texts": ["\x00"] * 9})
    assert (too_many.status, too_many.where) == (413, "request body: texts")


def test_shape_errors_are_unchanged():
    both = refused({"text": "a", "texts": ["b"]})
    assert (both.status, both.where, "problems" in both.body()) == (422, "request body", False)
    assert refused({"texts": []}).what == "`texts` is empty"


def test_feedback_fields_follow_the_text_rules():
    assert FeedbackRequest(prediction_id="p1", label="card_arrival").annotator == "api"
    for field in ("label", "annotator", "prediction_id", "feedback_id"):
        body = {"prediction_id": "p1", "label": "card_arrival", field: "card\x1b[2Jarrival"}
        with pytest.raises(ValidationError) as err:
            FeedbackRequest(**body)
        answer = validation_error_body(err.value.errors())
        assert answer["where"] == field
        assert f"`{field}` holds a control character U+001B (ESC) at position 4" in answer["error"]


def test_a_lone_surrogate_in_a_feedback_field_is_named_not_a_parse_error():
    with pytest.raises(ValidationError) as err:
        FeedbackRequest(**json.loads('{"prediction_id": "p\\udc80", "label": "card_arrival"}'))
    answer = validation_error_body(err.value.errors())
    assert answer["where"] == "prediction_id"
    assert "`prediction_id` holds a lone surrogate U+DC80 at position 1" in answer["error"]
    with pytest.raises(ValidationError, match="valid string"):  # a non-string is still a type error
        FeedbackRequest(prediction_id="p1", label=42)
