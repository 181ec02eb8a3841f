"""The OpenAPI document: FastAPI's, completed with what this deployment enforces, so a client can trust it.

The routes declare their error statuses (`error_responses`); `openapi_document` adds what only the running replica
knows: the title from the dataset and taxonomy served, the taxonomy as the feedback label's enum, the request
limits, whether `text` is accepted with a correction, and the API key scheme when keys are checked.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import Any

from intentops.api.middleware import OPEN_PATHS
from intentops.api.schemas import TEXT_PATTERN, ErrorBody

# Our statuses: the body is ErrorBody. The texts say when each happens.
_OURS = {
    400: "the body could not be read as UTF-8 JSON text",
    401: "missing or wrong API key (when the deployment checks keys: $INTENTOPS_API_KEY)",
    404: "not found: see the error's `where` and `fix`",
    409: "a retry with the same feedback_id but another correction",
    413: "too large: the body (serving.max_body_bytes), the number of texts (max_texts) or a text "
    "(max_text_chars)",
    422: "a body that is not valid JSON or breaks this schema or the text rules; `problems` lists every bad "
    "text of a request",
    500: "this request failed inside the replica; report the X-Request-ID response header",
}
# Ray Serve's own answers: they never reach the app, and their body is Serve's plain text, not ErrorBody.
_SERVE = {
    408: "Ray Serve's own answer: the request ran past the deployment's request timeout "
    "(request_timeout_s). The body is Serve's plain text, not this API's error shape; retry.",
    503: "Ray Serve's own answer: the replicas' queues are full (max_queued_requests) or no replica is "
    "running. The body is Serve's plain text, not this API's error shape; retry with backoff.",
}
# /v1/feedback's own texts: its 503 is ours (the store) as well as Serve's.
FEEDBACK_ERRORS = {
    404: "unknown prediction id: send one that POST /v1/predict returned",
    503: "the prediction store cannot take the correction now: this API's error shape and a Retry-After header "
    "(or feedback is off: serving.store.record_predictions). " + _SERVE[503],
}


def error_responses(*codes: int, overrides: Mapping[int, str] | None = None) -> dict[int, dict[str, Any]]:
    """The `responses` of a route for these statuses: ErrorBody for ours, a description only for Serve's.

    Args:
        overrides: a route's own description of a status (ErrorBody as its body).
    """
    overrides = overrides or {}
    out: dict[int, dict[str, Any]] = {}
    for code in codes:
        if code in overrides or code in _OURS:
            out[code] = {"model": ErrorBody, "description": overrides.get(code) or _OURS[code]}
        else:
            out[code] = {"description": _SERVE[code]}
    return out


def dataset_name(card: Mapping[str, Any]) -> str | None:
    """The dataset the model was trained on, as its card (export's card.json: params.data.name) says."""
    data = (card.get("params") or {}).get("data") or {}
    return data.get("name") or card.get("dataset")


def api_title(card: Mapping[str, Any], labels: Collection[str]) -> tuple[str, str]:
    """(title, summary) of the document, from the dataset and the taxonomy served."""
    dataset = dataset_name(card)
    title = f"intentops: {dataset} intents" if dataset else "intentops intents"
    source = f"the {dataset} taxonomy" if dataset else "the served bundle's taxonomy"
    return title, f"Intent classification of customer messages into {len(labels)} intents of {source}"


def openapi_document(
    base: Mapping[str, Any],
    labels: Collection[str],
    card: Mapping[str, Any],
    settings: Mapping[str, Any],
    keys_checked: bool,
) -> dict[str, Any]:
    """FastAPI's document (`base`, not changed) completed for the model and settings being served.

    Args:
        labels: the served bundle's taxonomy: the only labels /v1/feedback takes.
        card: the bundle's card (card.json), for the title.
        settings: `serving` (max_texts, max_text_chars, feedback.accept_text).
        keys_checked: an API key is required (middleware.Policy): the key schemes and 401 are declared.
    """
    doc = copy.deepcopy(dict(base))
    doc["info"]["title"], doc["info"]["summary"] = api_title(card, labels)
    schemas = doc["components"]["schemas"]
    _limit_texts(schemas["PredictRequest"], settings["max_texts"], settings["max_text_chars"])
    _feedback_taxonomy(
        schemas["FeedbackRequest"],
        sorted(labels),
        settings["feedback"]["accept_text"],
        settings["max_text_chars"],
    )
    if keys_checked:
        _require_keys(doc)
    return doc


def _limit_texts(schema: dict[str, Any], max_texts: int, max_chars: int) -> None:
    """The request limits (413 past them) on the predict body."""
    props = schema["properties"]
    props["text"]["maxLength"] = max_chars
    props["texts"]["maxItems"] = max_texts
    props["texts"]["items"]["maxLength"] = max_chars


def _feedback_taxonomy(schema: dict[str, Any], labels: list[str], accept_text: bool, max_chars: int) -> None:
    """The label as an enum of the taxonomy; `text` only where the deployment takes it (else 422)."""
    props = schema["properties"]
    props["label"]["enum"] = labels
    props["label"]["description"] = "an intent of the served model's taxonomy (GET /v1/model lists them)"
    if accept_text:
        props["text"].update(pattern=TEXT_PATTERN, maxLength=max_chars)
    else:
        props.pop("text", None)
    schema["examples"] = [
        {
            "prediction_id": "3f1c2a9e-5b7d-4e0a-9c61-0d2b8f4a7e15",
            "label": labels[0],
            "feedback_id": "fb-0001",
        }
    ]


def _require_keys(doc: dict[str, Any]) -> None:
    """The two ways to send the key, required on every operation but the probes, and their 401."""
    doc["components"]["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    unauthorized = {
        "description": _OURS[401],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for path, operations in doc["paths"].items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
            operation["responses"].setdefault("401", unauthorized)
