"""Every prediction id the API returned, so that /v1/feedback can tell a real id from a made-up one.

Only the id, model version, intent, confidence and review flag are kept (never the text; the text of
a needs_review prediction goes to the review queue). The `predictions` table belongs in
intentops.feedback.store as schema version 2; until it is there, `ensure_ledger` creates the same
table here (create_all skips an existing table, so the later migration finds it in place).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from intentops.feedback import store

_metadata = sa.MetaData()
_predictions = sa.Table(
    "predictions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(128), nullable=False, unique=True),
    sa.Column("model_version", sa.String(128), nullable=False),
    sa.Column("intent", sa.String(128), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("needs_review", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)


def predictions_table() -> sa.Table:
    """The store's predictions table once it has one, else this module's."""
    return getattr(store, "predictions", None) or _predictions


def ensure_ledger(engine: Engine) -> None:
    """Check the store's schema, then create the predictions table if the store does not manage it yet."""
    store.check_schema(engine)
    if getattr(store, "predictions", None) is None:
        _metadata.create_all(engine)


def record(engine: Engine, rows: Sequence[Mapping[str, Any]], review_items: Sequence[Mapping[str, Any]]) -> None:
    """Store a batch of API rows (shape of serve_api.shape_predictions) and queue the needs_review ones, in one go.

    Args:
        rows: the shaped predictions.
        review_items: review-queue items (see store.enqueue) for the rows that need review.
    """
    now = store.now_utc()
    table = predictions_table()
    values = [{"prediction_id": r["prediction_id"], "model_version": r["model_version"], "intent": r["intent"],
               "confidence": r["confidence"], "needs_review": r["needs_review"], "created_at": now} for r in rows]
    with engine.begin() as conn:
        conn.execute(table.insert(), values)  # fresh uuid4s: no conflict to handle
    if review_items:
        store.enqueue(engine, review_items)


def known(engine: Engine, prediction_id: str) -> bool:
    """True when the API returned this prediction id."""
    table = predictions_table()
    with engine.connect() as conn:
        return conn.execute(sa.select(table.c.id).where(table.c.prediction_id == prediction_id).limit(1)).first() \
            is not None
