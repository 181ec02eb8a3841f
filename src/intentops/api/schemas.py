"""The API's requests and responses: pydantic models (also the OpenAPI document at /docs), checks and rows."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from intentops.data.text import REFUSED, text_problem
from intentops.errors import UserError


class RequestError(UserError):
    """A bad request: `status` is the HTTP code, the body is {"error", "where", "fix"}.

    Args:
        problems: one {"index", "error"} per bad item of a request's texts; the body lists them under
            "problems" (only when given), so a client learns every bad item from one response.
    """

    def __init__(
        self,
        status: int,
        what: str,
        where: str | None = None,
        fix: str | None = None,
        problems: list[dict[str, Any]] | None = None,
    ):
        self.status, self.problems = status, problems
        super().__init__(what, where, fix)

    def body(self) -> dict[str, Any]:
        body = {"error": self.what, "where": self.where, "fix": self.fix}
        if self.problems is not None:
            body["problems"] = self.problems
        return body


def _allowed_chars(refused: str) -> str:
    """A regex character class body of `refused` (REFUSED's), every non-ASCII-printable code point as an
    escape: the same in Python, Rust and ECMA-262 regexes."""
    return "".join(c if " " < c < "\x7f" else f"\\u{ord(c):04x}" for c in refused)


# Without the surrogates: no valid Unicode string holds one (a JSON "\ud800" escape alone makes one, refused all
# the same), and regex engines that validate schemas (Rust's, Go's) refuse a surrogate range.
_REFUSED_CLASS = _allowed_chars(REFUSED.pattern[1:-1].replace("\ud800-\udfff", ""))
# What the server takes as a text (request_texts, intentops.data.text): no refused character, not blank.
TEXT_PATTERN = f"^[^{_REFUSED_CLASS}]*[^\\s{_REFUSED_CLASS}][^{_REFUSED_CLASS}]*$"
# Any other string field the server checks with text_problem (ids, labels, notes): no refused character.
CLEAN_PATTERN = f"^[^{_REFUSED_CLASS}]*$"


def _predict_request_schema(schema: dict[str, Any]) -> None:
    """What request_texts enforces, said in the schema: `text` or `texts` (never null), exactly one of them."""
    text = {"type": "string", "pattern": TEXT_PATTERN, "minLength": 1}
    schema["properties"] = {
        "text": {**text, "title": "Text", "description": "one customer message"},
        "texts": {
            "type": "array",
            "items": text,
            "minItems": 1,
            "title": "Texts",
            "description": "several messages, answered in order",
        },
    }
    schema["oneOf"] = [{"required": ["text"]}, {"required": ["texts"]}]


class PredictRequest(BaseModel):
    """One text or a list of texts; exactly one of the two."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_predict_request_schema)
    text: str | None = None
    texts: list[str] | None = None

    @field_validator("text", "texts", mode="before")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        """An explicit null is refused (the schema has no null); a missing field is None."""
        if value is None:
            raise ValueError(f"`{info.field_name}` is null; send a value or leave the field out")
        return value


class Problem(BaseModel):
    index: int = Field(description="the position of the bad text (0 for `text`)")
    error: str


class ErrorBody(BaseModel):
    """Every error this API writes: what was wrong, where, and what to do."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "text of 2301 characters; the limit is 2000",
                    "where": "request body: text",
                    "fix": "send at most 2000 characters (the first part of the message)",
                }
            ]
        }
    )
    error: str = Field(description="what was wrong")
    where: str | None = Field(description="where: the header, the request body field, the setting")
    fix: str | None = Field(description="what to do about it")
    problems: list[Problem] | None = Field(
        default=None, description="every bad text of the request (a 422 on their content only)"
    )


class TopK(BaseModel):
    intent: str
    confidence: float


class Prediction(BaseModel):
    prediction_id: str = Field(description="send it back with POST /v1/feedback")
    intent: str = Field(description="the top-1 intent (a suggestion only when needs_review)")
    confidence: float = Field(description="calibrated top-1 probability")
    top_k: list[TopK]
    out_of_scope: bool = Field(
        description="the text is out of distribution: none of the model's intents (reason out_of_distribution)"
    )
    reason: Literal["out_of_distribution", "low_confidence", "ambiguous"] | None = Field(
        description="why the text needs review, the first that applies: out_of_distribution (the out-of-scope "
        "score is past the bundle's threshold, or the top-1 is a trained out-of-scope class); low_confidence "
        "(top-1 below min_confidence); ambiguous (top1 - top2 below min_margin); null when it needs none"
    )
    needs_review: bool = Field(
        description="do not route automatically: the text goes to human review (out of scope, low confidence "
        "or ambiguous; `reason` says which)"
    )
    model_version: str


PREDICTION_EXAMPLE = {
    "prediction_id": "3f1c2a9e-5b7d-4e0a-9c61-0d2b8f4a7e15",
    "intent": "card_arrival",
    "confidence": 0.94,
    "top_k": [
        {"intent": "card_arrival", "confidence": 0.94},
        {"intent": "card_delivery_estimate", "confidence": 0.04},
        {"intent": "lost_or_stolen_card", "confidence": 0.01},
    ],
    "out_of_scope": False,
    "reason": None,
    "needs_review": False,
    "model_version": "m-5d0c3e1a9b7f",
}


class PredictResponse(BaseModel):
    """One prediction per text, in the order sent."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "6b1f0c2d-3e4a-4b5c-8d9e-0f1a2b3c4d5e",
                    "model_version": "m-5d0c3e1a9b7f",
                    "predictions": [PREDICTION_EXAMPLE],
                }
            ]
        }
    )
    request_id: str
    model_version: str
    predictions: list[Prediction]


class FeedbackRequest(BaseModel):
    """A correction for a prediction the API returned; `feedback_id` makes a retry store nothing twice.

    Who corrected is the API key's client (middleware.parse_keys), never `annotator`: that field is accepted for
    compatibility and stored as a note. `text` (the customer's message) is accepted only when
    serving.feedback.accept_text is on, for a prediction whose text the queue does not hold.
    """

    model_config = ConfigDict(extra="forbid")
    # The patterns say in the schema what _follows_text_rules checks (the served document adds the label's enum).
    prediction_id: str = Field(min_length=1, max_length=128, json_schema_extra={"pattern": CLEAN_PATTERN})
    label: str = Field(min_length=1, max_length=128)
    annotator: str = Field(
        default="api",
        min_length=1,
        max_length=128,
        description="a note only: the vote is recorded under the API key's client",
        json_schema_extra={"pattern": CLEAN_PATTERN},
    )
    feedback_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="idempotency key, unique per client",
        json_schema_extra={"pattern": CLEAN_PATTERN},
    )
    text: str | None = Field(
        default=None,
        min_length=1,
        description="the message that was classified, to queue it for labelling (serving.feedback.accept_text)",
    )

    # mode="before": pydantic's own length check cannot read a lone surrogate and would answer "unable to
    # parse raw data as a unicode string"; checked first, the 422 names the field and the character.
    @field_validator("prediction_id", "label", "annotator", "feedback_id", "text", mode="before")
    @classmethod
    def _follows_text_rules(cls, value: Any, info: ValidationInfo) -> Any:
        """The text rules of intentops.data.text (a non-string is left to the type check)."""
        problem = text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            raise ValueError(f"`{info.field_name}` holds a {problem}")
        return value


class FeedbackResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prediction_id": "3f1c2a9e-5b7d-4e0a-9c61-0d2b8f4a7e15",
                    "label": "card_delivery_estimate",
                    "stored": True,
                    "client": "helpdesk",
                    "vote": True,
                    "text_queued": False,
                }
            ]
        }
    )
    prediction_id: str
    label: str
    stored: bool = Field(description="false when the same feedback was already stored (an idempotent retry)")
    client: str = Field(
        description="who the correction is recorded under: the API key's client, not `annotator`"
    )
    vote: bool = Field(
        description="it is a labelling vote `api:<client>`: the prediction's text is in the review queue"
    )
    text_queued: bool = Field(
        description="the request's `text` joined the review queue (reason `correction`)"
    )


def feedback_text(req: FeedbackRequest, accept_text: bool, max_chars: int) -> str | None:
    """The correction's `text` when one is sent and allowed (serving.feedback.accept_text), else a RequestError:
    422 when texts are not accepted or the text is blank, 413 when it is longer than serving.max_text_chars."""
    if req.text is None:
        return None
    if not accept_text:
        raise RequestError(
            422,
            "this deployment does not accept texts with corrections",
            where="request body: text (serving.feedback.accept_text is false)",
            fix="send the correction without `text`, or have the operator set serving.feedback.accept_text: true",
        )
    if len(req.text) > max_chars:
        raise RequestError(
            413,
            f"text of {len(req.text)} characters; the limit is {max_chars}",
            where="request body: text",
            fix=f"send at most {max_chars} characters (what was sent to /v1/predict)",
        )
    if req.text.isspace():
        raise RequestError(422, "empty text", where="request body: text", fix="send the customer's message")
    return req.text


def request_texts(req: PredictRequest, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a predict request, or a RequestError (422 shape or content, 413 size).

    A 413 (too many texts, a text too long) wins over content problems; content problems (an empty text, one
    that breaks the text rules of intentops.data.text) of every item are answered in one 422 that lists them.
    """
    if (req.text is None) == (req.texts is None):
        raise RequestError(
            422,
            "give exactly one of `text` (a string) or `texts` (a list of strings)",
            where="request body",
            fix='send {"text": "..."} or {"texts": ["...", "..."]}',
        )
    texts = [req.text] if req.text is not None else list(req.texts or [])
    if not texts:
        raise RequestError(422, "`texts` is empty", where="request body: texts", fix="send at least one text")
    if len(texts) > max_texts:
        raise RequestError(
            413,
            f"{len(texts)} texts in one request; the limit is {max_texts}",
            where="request body: texts",
            fix=f"split the list into requests of at most {max_texts}",
        )
    problems: list[dict[str, Any]] = []  # filled only when a text is bad
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise RequestError(
                413,
                f"text of {len(text)} characters; the limit is {max_chars}",
                where=f"request body: {_item_where(req, i)}",
                fix=f"send at most {max_chars} characters (the first part of the message)",
            )
        problem = "empty text" if not text or text.isspace() else text_problem(text)
        if problem is not None:
            problems.append({"index": i, "error": problem})
    if problems:
        raise content_error(req, problems, len(texts))
    return texts


def _item_where(req: PredictRequest, index: int) -> str:
    return "text" if req.text is not None else f"texts[{index}]"


def content_error(req: PredictRequest, problems: list[dict[str, Any]], n_texts: int) -> RequestError:
    """The one 422 for every bad item of a request: the count, the first problem, each item in `problems`."""
    first = problems[0]
    what = first["error"]  # `text`: the one problem; `texts`: how many items are bad, and the first
    if req.text is None:
        then = "; the first, " if len(problems) > 1 else ": "
        what = f"{len(problems)} of {n_texts} texts refused{then}texts[{first['index']}]: {what}"
    if all(p["error"] == "empty text" for p in problems):
        fix = "send the customer's message"
    else:
        fix = (
            "send the customer's message without control characters (tab, CR and LF are fine), lone surrogates "
            "or noncharacters; `problems` lists every bad item"
        )
    where = "request body: " + ", ".join(_item_where(req, p["index"]) for p in problems)
    return RequestError(422, what, where=where, fix=fix, problems=problems)


def shape_predictions(raw: Sequence[Mapping[str, Any]], version: str) -> list[dict[str, Any]]:
    """Predictor.predict rows -> API rows: a new prediction id and the model version added (key order as documented)."""
    return [
        {
            "prediction_id": str(uuid.uuid4()),
            "intent": r["intent"],
            "confidence": r["confidence"],
            "top_k": r["top_k"],
            "out_of_scope": r["out_of_scope"],
            "reason": r["reason"],
            "needs_review": r["needs_review"],
            "model_version": version,
        }
        for r in raw
    ]


def validation_error_body(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The 422 body for a request FastAPI could not parse: the first error, where it is, how to fix it."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request body"
    return {
        "error": f"invalid request: {first.get('msg', 'bad body')}",
        "where": where,
        "fix": "send a JSON body as documented at /docs",
    }
