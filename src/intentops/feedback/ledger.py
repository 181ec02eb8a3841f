"""Every prediction id the API returned (store.predictions), so /v1/feedback can tell a real id from a made-up one.

Only the id, model version, intent, confidence and review flag are kept, never the text; the text of an
out-of-scope prediction (needs_review) goes to the review queue with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from intentops.feedback import store


def record_calls(engine: Engine, calls: Sequence[tuple[Sequence[str], Sequence[Mapping[str, Any]]]]) -> None:
    """Store model calls' API rows (shape of api.schemas.shape_predictions) and queue the texts of flagged
    ones, in one transaction.

    The out-of-scope rows (out_of_distribution, low_confidence, ambiguous) go to the review queue with their
    reason, in the same commit as the ids.

    Args:
        calls: (texts, shaped predictions) per model call, the texts in the order of the rows.
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
    review = [item for texts, rows in calls for item in review_items(texts, rows, now)]
    with engine.begin() as conn:  # one transaction (one commit) per flush
        conn.execute(store.predictions.insert(), values)  # fresh uuid4s: no conflict to handle
        if review:
            conn.execute(store.review_queue.insert(), review)  # same fresh ids: none is queued yet


def review_items(
    texts: Sequence[str], rows: Sequence[Mapping[str, Any]], now: Any = None
) -> list[dict[str, Any]]:
    """Review-queue items (see store.enqueue) for the rows that need review, with the reason they do."""
    return [
        {
            "prediction_id": r["prediction_id"],
            "text": t,
            "model_version": r["model_version"],
            "suggested_intent": r["intent"],
            "confidence": r["confidence"],
            "reason": r["reason"],
            "top_k": store_top_k(r),
            **({"created_at": now} if now is not None else {}),
        }
        for t, r in zip(texts, rows, strict=True)
        if r["needs_review"]
    ]


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
