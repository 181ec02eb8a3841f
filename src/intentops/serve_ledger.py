"""Every prediction id the API returned (store.predictions), so /v1/feedback can tell a real id from a made-up one.

Only the id, model version, intent, confidence and review flag are kept, never the text; the text of a
needs_review prediction goes to the review queue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from intentops.feedback import store


def record(engine: Engine, rows: Sequence[Mapping[str, Any]], review_items: Sequence[Mapping[str, Any]]) -> None:
    """Store a batch of API rows (shape of serve_api.shape_predictions) and queue the needs_review ones.

    Args:
        rows: the shaped predictions.
        review_items: review-queue items (see store.enqueue) for the rows that need review.
    """
    now = store.now_utc()
    values = [{"prediction_id": r["prediction_id"], "model_version": r["model_version"], "intent": r["intent"],
               "confidence": r["confidence"], "needs_review": r["needs_review"], "created_at": now} for r in rows]
    with engine.begin() as conn:
        conn.execute(store.predictions.insert(), values)  # fresh uuid4s: no conflict to handle
    if review_items:
        store.enqueue(engine, review_items)


def known(engine: Engine, prediction_id: str) -> bool:
    """True when the API returned this prediction id."""
    table = store.predictions
    with engine.connect() as conn:
        return conn.execute(sa.select(table.c.id).where(table.c.prediction_id == prediction_id).limit(1)).first() \
            is not None
