"""Live accuracy from labels: the audit sample's resolved labels against what was served, and the API's share of them.

The audit sample (review_queue rows with `audit` true; serving.store.audit_share) is drawn from the prediction
id, independently of the model's answer, so its labelled accuracy is an unbiased estimate of live accuracy;
`intentops drift-check` shows it next to its label-free estimate. An item's label is the one `label export`
would write: the same votes (CLI and `api:<client>`) through the same `label.resolve`.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from intentops.errors import UserError
from intentops.feedback import label, store

# The normal quantile of a two-sided 95 % interval.
_Z95 = 1.959963984540054


def labelled_accuracy(params: Any, windows: list[tuple[datetime, datetime]]) -> list[dict]:
    """Per window [start, end): the audit items served in it whose label is resolved, and how many the served
    prediction got right; and the predictions served in it that a client corrected (known errors, biased: clients
    correct what they notice, so they bound the accuracy from above, nothing more).

    Returns:
        one {"n", "correct", "accuracy" (None when n is 0), "low", "high" (Wilson 95 %), "corrected_errors"} per
        window, in order.

    Raises:
        UserError: the store cannot be reached or its schema is not current (where: the database; fix).
    """
    import sqlalchemy as sa

    engine = store.engine_from_params(params)
    try:
        review = label.read_review(engine, params)
        corrected = store.corrected_errors(engine, () if review.count_anonymous else (store.ANONYMOUS,))
    except sa.exc.SQLAlchemyError as err:
        raise UserError(
            f"cannot read the feedback store: {type(err).__name__}",
            where=engine.url.render_as_string(hide_password=True),
            fix=f"check ${store.DB_URL_ENV} and run `intentops db upgrade`",
        ) from err
    finally:
        engine.dispose()
    outcomes = audit_outcomes(review)
    return [
        {**window_accuracy(outcomes, start, end), "corrected_errors": count_in(corrected, start, end)}
        for start, end in windows
    ]


def count_in(times: list[datetime], start: datetime, end: datetime) -> int:
    """How many of `times` fall in [start, end)."""
    start, end = _utc(start), _utc(end)
    return sum(start <= _utc(t) < end for t in times)


def audit_outcomes(review: label.Review) -> list[tuple[datetime, bool]]:
    """(served at, served intent == resolved label) of every audit item whose label is resolved."""
    out = []
    for item in review.items:
        if item.get("audit"):
            resolved, _ = review.resolve(item["prediction_id"])
            if resolved is not None:
                out.append((_utc(item["created_at"]), resolved == item["suggested_intent"]))
    return out


def window_accuracy(outcomes: list[tuple[datetime, bool]], start: datetime, end: datetime) -> dict[str, Any]:
    """{"n", "correct", "accuracy", "low", "high"} of the outcomes served in [start, end)."""
    start, end = _utc(start), _utc(end)
    hits = [ok for at, ok in outcomes if start <= at < end]
    n, correct = len(hits), sum(hits)
    low, high = wilson(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "low": low, "high": high}


def wilson(k: int, n: int, z: float = _Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval of k successes in n trials (None, None for n = 0): right at 0 and n, unlike
    the normal approximation, which matters for the small samples an audit share gives."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _utc(at: datetime) -> datetime:
    """A timestamp in UTC; SQLite returns naive ones (stored in UTC)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def api_corrections(params: Any) -> dict[str, int]:
    """How many /v1/feedback corrections the store holds and how many reached the last export.

    Returns:
        {"corrections": feedback rows, "clients": distinct clients, "exported": API votes in the rows of
        paths.feedback_labels (one per client and exported item; a client's earlier corrections it replaced do
        not count), "exported_rows": those rows}.
    """
    engine = store.engine_from_params(params)
    try:
        store.check_schema(engine)
        rows = store.table_rows(engine, store.feedback)
    finally:
        engine.dispose()
    exported = exported_api_votes(Path(params.paths.feedback_labels))
    return {
        "corrections": len(rows),
        "clients": len({r["client"] for r in rows}),
        "exported": sum(exported),
        "exported_rows": sum(1 for n in exported if n),
    }


def exported_api_votes(path: Path) -> list[int]:
    """Per row of a labels.csv (`label export`), how many of its votes are API votes; [] without the file."""
    import pandas as pd

    if not path.is_file():
        return []
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "votes" not in table:
        return []
    return [
        sum(v.startswith(label.API_PREFIX) for v in json.loads(votes or "{}")) for votes in table["votes"]
    ]
