"""Every prediction id the API returned (store.predictions), so /v1/feedback can tell a real id from a made-up one.

Only the id, model version, intent, confidence and review flag are kept, never the text; the text of a
prediction that needs review (`needs_review`: out of scope, low confidence or ambiguous) goes to the review queue
with its reason, and so does the text of a
prediction in the audit sample (serving.store.audit_share; reason `audit`), whose labels measure live accuracy.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from intentops.feedback import store

# The review-queue reason of a text kept only because it is in the audit sample.
AUDIT = "audit"


def record_calls(
    engine: Engine,
    calls: Sequence[tuple[Sequence[str], Sequence[Mapping[str, Any]]]],
    audit_share: float = 0.0,
) -> None:
    """Store model calls' API rows (shape of api.schemas.shape_predictions) and queue the texts of flagged
    ones, in one transaction.

    The rows that need review (`needs_review`; reason out_of_distribution, low_confidence or ambiguous) go to the
    review queue with their reason, in the same commit as the ids.

    Args:
        calls: (texts, shaped predictions) per model call, the texts in the order of the rows.
        audit_share: the share of predictions whose text is kept for audit labelling (see in_audit).
    """
    now = store.now_utc()
    values = [
        {
            "prediction_id": r["prediction_id"],
            "model_version": r["model_version"],
            "intent": r["intent"],
            "confidence": r["confidence"],
            "needs_review": r["needs_review"],
            "created_at": now,
        }
        for _, rows in calls
        for r in rows
    ]
    review = [item for texts, rows in calls for item in review_items(texts, rows, now, audit_share)]
    with engine.begin() as conn:  # one transaction (one commit) per flush
        conn.execute(store.predictions.insert(), values)  # fresh uuid4s: no conflict to handle
        if review:
            conn.execute(store.review_queue.insert(), review)  # same fresh ids: none is queued yet


def review_items(
    texts: Sequence[str], rows: Sequence[Mapping[str, Any]], now: Any = None, audit_share: float = 0.0
) -> list[dict[str, Any]]:
    """Review-queue items (see store.enqueue) for the rows that need review, with the reason they do, and for
    the rows in the audit sample (reason `audit` unless they need review anyway; `audit` true either way)."""
    items = []
    for t, r in zip(texts, rows, strict=True):
        audit = in_audit(r["prediction_id"], audit_share)
        if not (r["needs_review"] or audit):
            continue
        items.append(
            {
                "prediction_id": r["prediction_id"],
                "text": t,
                "model_version": r["model_version"],
                "suggested_intent": r["intent"],
                "confidence": r["confidence"],
                "reason": r["reason"] if r["needs_review"] else AUDIT,
                "audit": audit,
                "top_k": store_top_k(r),
                **({"created_at": now} if now is not None else {}),
            }
        )
    return items


def in_audit(prediction_id: str, share: float) -> bool:
    """True for a `share` of prediction ids, decided by the id's last 32 bits (random in a uuid4).

    The id is drawn before the model's answer is known and is independent of it, so the sample is unbiased
    (confidence, intent and review flag play no part) and the response is the same in or out of it.
    """
    if share <= 0:
        return False
    try:
        bits = uuid.UUID(prediction_id).int & 0xFFFFFFFF
    except ValueError:
        return False
    return bits < share * 2**32


def store_top_k(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Top-k in the review queue's shape: [{"intent", "score"}]."""
    return [{"intent": t["intent"], "score": t["confidence"]} for t in row["top_k"]]


def known(engine: Engine, prediction_id: str) -> bool:
    """True when the API returned this prediction id."""
    table = store.predictions
    with engine.connect() as conn:
        return (
            conn.execute(sa.select(table.c.id).where(table.c.prediction_id == prediction_id).limit(1)).first()
            is not None
        )


# The review-queue reason of a text a client sent with its correction (POST /v1/feedback `text`).
CORRECTION = "correction"


def record_correction(
    engine: Engine,
    prediction_id: str,
    label: str,
    client: str,
    *,
    feedback_id: str | None = None,
    annotator: str | None = None,
    text: str | None = None,
) -> dict[str, bool] | None:
    """Store a client's correction of a prediction the API returned; None when the id is unknown.

    A `text` (already allowed and checked by the API) joins the review queue with reason `correction` when the
    queue does not hold the prediction's text yet, so the correction becomes a labelling vote; otherwise it is
    ignored (the queue keeps the text that was served). Every correction is stored either way: the predictions
    row holds the served intent, so the correction also says whether the served prediction was right.

    Returns:
        {"stored": new (False for a retry), "vote": the queue holds the text, "text_queued": the text was added}.

    Raises:
        store.FeedbackConflict: the client's feedback_id already holds another correction.
    """
    served = store.prediction(engine, prediction_id)
    if served is None:
        return None
    stored = store.add_feedback(engine, prediction_id, label, client, feedback_id, annotator=annotator)
    queued = text is not None and store.enqueue(engine, [correction_item(served, text)]) == 1
    return {"stored": stored, "vote": queued or in_queue(engine, prediction_id), "text_queued": queued}


def correction_item(served: Mapping[str, Any], text: str) -> dict[str, Any]:
    """The review-queue item of a client-sent text: the served prediction (its top-k is not kept: top-1 only)."""
    return {
        "prediction_id": served["prediction_id"],
        "text": text,
        "model_version": served["model_version"],
        "suggested_intent": served["intent"],
        "confidence": served["confidence"],
        "reason": CORRECTION,
        "top_k": [{"intent": served["intent"], "score": served["confidence"]}],
    }


def in_queue(engine: Engine, prediction_id: str) -> bool:
    """True when the review queue holds this prediction's text."""
    table = store.review_queue
    with engine.connect() as conn:
        query = sa.select(table.c.id).where(table.c.prediction_id == prediction_id).limit(1)
        return conn.execute(query).first() is not None
