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
from intentops.serve_api import store_top_k


def record(engine: Engine, texts: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Store a model call's API rows (shape of serve_api.shape_predictions) and queue the texts of flagged ones.

    One transaction for the ids; the out-of-scope rows (out_of_distribution, low_confidence, ambiguous)
    go to the review queue with their reason.

    Args:
        texts: the texts, in the order of `rows`.
        rows: the shaped predictions.
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
        for r in rows
    ]
    with engine.begin() as conn:
        conn.execute(store.predictions.insert(), values)  # fresh uuid4s: no conflict to handle
    review = review_items(texts, rows, now)
    if review:
        store.enqueue(engine, review)


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


def known(engine: Engine, prediction_id: str) -> bool:
    """True when the API returned this prediction id."""
    table = store.predictions
    with engine.connect() as conn:
        return (
            conn.execute(sa.select(table.c.id).where(table.c.prediction_id == prediction_id).limit(1)).first()
            is not None
        )
