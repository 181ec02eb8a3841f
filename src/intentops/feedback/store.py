"""The review queue and feedback store: SQLAlchemy Core over SQLite (default) or PostgreSQL.

The schema is created and migrated only by `upgrade()` (`intentops db upgrade`); every other
function first checks the schema version. Writes are idempotent: each table has a natural key
and rows are inserted with INSERT ... ON CONFLICT DO NOTHING, so a retried request stores nothing twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from intentops.errors import UserError

DB_URL_ENV = "INTENTOPS_DB_URL"

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

# Predictions the serving app flagged for review (low confidence, disagreement, sampling...).
review_queue = sa.Table(
    "review_queue",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(128), nullable=False, unique=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("model_version", sa.String(128), nullable=False),
    sa.Column("suggested_intent", sa.String(128), nullable=False),
    sa.Column("top_k", sa.JSON, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    # In the audit sample (serving.store.audit_share), whatever the reason: the unbiased sample of served
    # predictions whose labels measure live accuracy (feedback.audit). Added in schema version 3.
    sa.Column("audit", sa.Boolean, nullable=False, server_default=sa.false()),
)

# Corrections sent with a prediction id through POST /v1/feedback (schema version 3). `client` is who sent it,
# from the API key (middleware.client_name); `annotator` is the request's free-text field, kept as a note only.
# `feedback_id` is the client's idempotency key, unique per client. Every correction is kept: a client's vote on
# a prediction is its latest row (label.load_state).
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("client", sa.String(128), nullable=False),
    sa.Column("feedback_id", sa.String(128), nullable=False),
    sa.Column("prediction_id", sa.String(128), nullable=False, index=True),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("annotator", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.UniqueConstraint("client", "feedback_id", name="uq_feedback_client_feedback_id"),
)

# The feedback table as versions 1-2 created it (feedback_id unique across clients): _v1 creates this shape so
# that a migration never changes, and _v3 rebuilds it into `feedback`.
_feedback_v1 = sa.Table(
    "feedback",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("feedback_id", sa.String(128), nullable=False, unique=True),
    sa.Column("prediction_id", sa.String(128), nullable=False, index=True),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("annotator", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)
# The client of corrections sent without an API key (auth off or no key set), and of those stored before
# version 3 (nobody was identified then).
ANONYMOUS = "anonymous"

# Every prediction id the API returned (never the text: needs_review texts go to the review queue),
# so that /v1/feedback can tell a real id from a made-up one. Added in schema version 2.
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(128), nullable=False, unique=True),
    sa.Column("model_version", sa.String(128), nullable=False),
    sa.Column("intent", sa.String(128), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("needs_review", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

# One label per annotator per queue item (the labelling CLI).
annotations = sa.Table(
    "annotations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(128), sa.ForeignKey("review_queue.prediction_id"), nullable=False),
    sa.Column("annotator", sa.String(128), nullable=False),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("prediction_id", "annotator", name="uq_annotation_item_annotator"),
)

# The adjudicator's final label for items without a majority (or flagged unclear).
adjudications = sa.Table(
    "adjudications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "prediction_id",
        sa.String(128),
        sa.ForeignKey("review_queue.prediction_id"),
        nullable=False,
        unique=True,
    ),
    sa.Column("adjudicator", sa.String(128), nullable=False),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


def _v1(conn: Connection) -> None:
    legacy = sa.MetaData()
    _v1_table(review_queue, legacy, drop="audit").create(conn)
    _feedback_v1.create(conn)
    metadata.create_all(conn, tables=[annotations, adjudications])


def _v1_table(table: sa.Table, into: sa.MetaData, drop: str) -> sa.Table:
    """`table` as version 1 created it: without the column a later version added."""
    columns = [
        sa.Column(
            c.name, c.type, primary_key=c.primary_key, nullable=c.nullable, unique=c.unique, index=c.index
        )
        for c in table.columns
        if c.name != drop
    ]
    return sa.Table(table.name, into, *columns)


def _v2(conn: Connection) -> None:
    metadata.create_all(conn, tables=[predictions])


def _v3(conn: Connection) -> None:
    """API corrections as votes and the audit sample.

    feedback_id becomes unique per client: the table is rebuilt (SQLite cannot drop a UNIQUE constraint with
    ALTER), its rows copied in order with client `anonymous` (nobody was identified before); review_queue
    gets the `audit` flag.
    """
    conn.execute(sa.text("ALTER TABLE review_queue ADD COLUMN audit BOOLEAN NOT NULL DEFAULT FALSE"))
    conn.execute(sa.text("ALTER TABLE feedback RENAME TO feedback_v2"))
    for index in ("ix_feedback_prediction_id", "ix_feedback_created_at"):  # indexes keep their names
        conn.execute(sa.text(f"DROP INDEX {index}"))
    feedback.create(conn)
    columns = "feedback_id, prediction_id, label, annotator, created_at"
    conn.execute(
        sa.text(
            f"INSERT INTO feedback (client, {columns}) "
            f"SELECT '{ANONYMOUS}', {columns} FROM feedback_v2 ORDER BY id"
        )
    )
    conn.execute(sa.text("DROP TABLE feedback_v2"))


# The shadow challenger's scores (schema version 4). One row per shadowed prediction: the champion's answer (what the client got) next to the challenger's
# (the registry's candidate, scored off the request path), for `intentops shadow report` and the promote gate.
shadow_scores = sa.Table(
    "shadow_scores",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(128), nullable=False),
    sa.Column("champion_version", sa.String(128), nullable=False),
    sa.Column("challenger_version", sa.String(128), nullable=False),
    sa.Column("champion_intent", sa.String(128), nullable=False),
    sa.Column("champion_confidence", sa.Float, nullable=False),
    sa.Column("challenger_intent", sa.String(128), nullable=False),
    sa.Column("challenger_confidence", sa.Float, nullable=False),
    sa.Column("challenger_ms", sa.Float, nullable=False),  # wall time of the challenger call that scored it
    sa.Column("challenger_batch", sa.Integer, nullable=False),  # texts in that call
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.UniqueConstraint("prediction_id", "challenger_version", name="uq_shadow_prediction_challenger"),
    sa.Index("ix_shadow_pair", "champion_version", "challenger_version"),
)


def _v4(conn: Connection) -> None:
    """The shadow challenger's scores."""
    metadata.create_all(conn, tables=[shadow_scores])


# Migration N brings the schema from version N-1 to N. Append, never edit a released one.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4]
SCHEMA_VERSION = len(MIGRATIONS)


def now_utc() -> datetime:
    return datetime.now(UTC)


def db_url(sqlite_path: str | os.PathLike) -> str:
    """$INTENTOPS_DB_URL, else a SQLite file at `sqlite_path` (paths.feedback_db)."""
    return os.environ.get(DB_URL_ENV) or f"sqlite:///{os.fspath(sqlite_path)}"


def make_engine(
    url: str,
    *,
    busy_timeout_ms: int = 30000,
    pool_size: int = 5,
    max_overflow: int = 10,
    statement_timeout_ms: int | None = None,
) -> Engine:
    """An engine safe for concurrent writers, whose errors never carry the statement's parameters.

    SQLite: WAL (readers never block the writer), a busy timeout, foreign keys on, and every
    transaction opened with BEGIN IMMEDIATE, so that writers queue on the lock up front instead of
    failing with SQLITE_BUSY when a read transaction tries to become a write.
    PostgreSQL: with `statement_timeout_ms`, the same bound on connecting, on waiting for a lock and on a
    statement (the API passes serving.store.timeout_s, so a slow or stopped server fails fast).
    `hide_parameters`: a failed INSERT of a review-queue row must not put the customer's text into a log.
    """
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as err:
        raise UserError(
            f"not a database URL: {url!r}",
            where=f"${DB_URL_ENV}",
            fix="e.g. postgresql+psycopg://user@host/db",
        ) from err
    if parsed.get_backend_name() != "sqlite":
        if parsed.drivername == "postgresql":  # the installed driver is psycopg 3, not psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_pre_ping=True,
            hide_parameters=True,
            **postgres_timeouts(statement_timeout_ms),
        )

    return sqlite_engine(parsed, busy_timeout_ms, pool_size, max_overflow, statement_timeout_ms is not None)


def sqlite_engine(
    parsed: sa.URL, busy_timeout_ms: int, pool_size: int, max_overflow: int, strict: bool
) -> Engine:
    """A SQLite engine (see make_engine); `strict` also bounds the wait for a pooled connection."""
    if parsed.database and parsed.database != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
    engine = sa.create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=max_overflow,
        hide_parameters=True,
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
        **({"pool_timeout": busy_timeout_ms / 1000} if strict else {}),
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable in WAL mode except on power loss
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def engine_from_params(
    params: Any, sqlite_path: str | os.PathLike | None = None, timeout_s: float | None = None
) -> Engine:
    """The engine for the configured store: $INTENTOPS_DB_URL, else the SQLite file `sqlite_path`.

    Args:
        params: the composed parameters (feedback.store holds the pool and busy-timeout settings).
        sqlite_path: the SQLite file; paths.feedback_db when None (the API passes serving.store.db).
        timeout_s: a strict bound on lock waits, connecting and statements (the API's; None: the
            store's busy timeout, for the CLI's long-running work).
    """
    s = params.feedback.store
    timeout_ms = None if timeout_s is None else max(1, int(timeout_s * 1000))
    return make_engine(
        db_url(params.paths.feedback_db if sqlite_path is None else sqlite_path),
        busy_timeout_ms=s.busy_timeout_ms if timeout_ms is None else timeout_ms,
        pool_size=s.pool_size,
        max_overflow=s.max_overflow,
        statement_timeout_ms=timeout_ms,
    )


def postgres_timeouts(timeout_ms: int | None) -> dict[str, Any]:
    """create_engine arguments bounding a PostgreSQL connect, pool wait, lock wait and statement."""
    if timeout_ms is None:
        return {}
    options = f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}"
    return {
        "pool_timeout": timeout_ms / 1000,
        "connect_args": {"connect_timeout": max(1, round(timeout_ms / 1000)), "options": options},
    }


def current_version(conn: Connection) -> int:
    """The applied schema version; 0 for an empty database."""
    if not sa.inspect(conn).has_table(schema_version.name):
        return 0
    return int(
        conn.execute(sa.select(sa.func.coalesce(sa.func.max(schema_version.c.version), 0))).scalar_one()
    )


def upgrade(engine: Engine, target: int | None = None) -> tuple[int, int]:
    """Apply the migrations the database lacks, in one transaction; returns (version before, after).

    Args:
        target: stop at this version (tests build an older database with it); default SCHEMA_VERSION.
    """
    target = SCHEMA_VERSION if target is None else target
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two concurrent upgrades would both see version 0; the lock serialises them
            # (SQLite's BEGIN IMMEDIATE already does).
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7305520901)"))
        schema_version.create(conn, checkfirst=True)
        before = current_version(conn)
        if before > SCHEMA_VERSION:
            raise UserError(
                f"the database schema is version {before}, newer than this code knows ({SCHEMA_VERSION})",
                where=_where(engine),
                fix="upgrade intentops",
            )
        for version in range(before + 1, target + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(schema_version.insert().values(version=version, applied_at=now_utc()))
    return before, max(before, target)


def check_schema(engine: Engine) -> None:
    """Raise a UserError unless the schema is at SCHEMA_VERSION."""
    try:
        with engine.connect() as conn:
            version = current_version(conn)
    except sa.exc.OperationalError as err:
        raise UserError(
            f"cannot open the database: {err.orig}", where=_where(engine), fix=f"check ${DB_URL_ENV}"
        ) from err
    if version != SCHEMA_VERSION:
        raise UserError(
            f"the database schema is version {version}; this code needs {SCHEMA_VERSION}",
            where=_where(engine),
            fix="run `intentops db upgrade`",
        )


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _insert_ignore(
    conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], key: Sequence[str]
) -> int:
    """INSERT ... ON CONFLICT (key) DO NOTHING; returns how many rows were new."""
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise UserError(
            f"unsupported database {conn.dialect.name!r}",
            where=f"${DB_URL_ENV}",
            fix="use SQLite or PostgreSQL",
        )
    # RETURNING rather than rowcount: psycopg reports -1 for an INSERT that SQLAlchemy gave a RETURNING.
    stmt = insert(table).on_conflict_do_nothing(index_elements=list(key)).returning(table.c.id)
    return sum(len(conn.execute(stmt, dict(row)).all()) for row in rows)


def enqueue(engine: Engine, items: Sequence[Mapping[str, Any]]) -> int:
    """Add predictions to the review queue; an item whose prediction_id is already there is skipped.

    Args:
        items: mappings with prediction_id, text, model_version, suggested_intent,
            top_k (a list of {"intent", "score"}), confidence, reason, and optionally created_at.

    Returns:
        how many items were new.
    """
    rows = [{**item, "created_at": (item.get("created_at") or now_utc()).astimezone(UTC)} for item in items]
    with engine.begin() as conn:
        return _insert_ignore(conn, review_queue, rows, ["prediction_id"])


class FeedbackConflict(Exception):
    """A client reused a feedback_id for another correction; `stored` is the correction stored under it."""

    def __init__(self, stored: Mapping[str, Any]):
        self.stored = dict(stored)
        super().__init__(f"feedback_id {stored['feedback_id']!r} already holds another correction")


def add_feedback(
    engine: Engine,
    prediction_id: str,
    label: str,
    client: str,
    feedback_id: str | None = None,
    created_at: datetime | None = None,
    annotator: str | None = None,
) -> bool:
    """Record a client's correction; True when new, False for a retry of one stored (same id, same correction).

    The idempotency key is (client, feedback_id): two clients may use the same ids. Without a feedback_id,
    one correction per (client, prediction, label). A client's later correction of the same prediction under
    a new feedback_id is stored too; its latest one is its vote (latest_corrections).

    Args:
        annotator: the request's free-text `annotator` field, kept as a note (default: the client).

    Raises:
        FeedbackConflict: the client's feedback_id already holds another prediction id or label.
    """
    row = {
        "client": client,
        "feedback_id": feedback_id or f"{prediction_id}:{label}",
        "prediction_id": prediction_id,
        "label": label,
        "annotator": annotator or client,
        "created_at": (created_at or now_utc()).astimezone(UTC),
    }
    with engine.begin() as conn:
        if _insert_ignore(conn, feedback, [row], ["client", "feedback_id"]) == 1:
            return True
        stored = (
            conn.execute(
                sa.select(feedback).where(
                    feedback.c.client == client, feedback.c.feedback_id == row["feedback_id"]
                )
            )
            .mappings()
            .one()
        )
    if (stored["prediction_id"], stored["label"]) != (prediction_id, label):
        raise FeedbackConflict(stored)
    return False


def latest_corrections(engine: Engine) -> list[dict[str, Any]]:
    """Each client's latest correction per prediction (its vote), oldest first: prediction_id, client, label,
    annotator, created_at, and in_queue (the prediction's text is in the review queue)."""
    latest = sa.select(sa.func.max(feedback.c.id)).group_by(feedback.c.client, feedback.c.prediction_id)
    in_queue = sa.exists().where(review_queue.c.prediction_id == feedback.c.prediction_id)
    query = (
        sa.select(
            feedback.c.prediction_id,
            feedback.c.client,
            feedback.c.label,
            feedback.c.annotator,
            feedback.c.created_at,
            in_queue.label("in_queue"),
        )
        .where(feedback.c.id.in_(latest))
        .order_by(feedback.c.id)
    )
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def corrected_errors(engine: Engine, exclude_clients: Sequence[str] = ()) -> list[datetime]:
    """When each prediction was served that a client's latest correction says was wrong (its label is not the
    served intent), one time per prediction, whether or not its text was queued."""
    latest = sa.select(sa.func.max(feedback.c.id)).group_by(feedback.c.client, feedback.c.prediction_id)
    query = (
        sa.select(predictions.c.prediction_id, predictions.c.created_at)
        .join(feedback, feedback.c.prediction_id == predictions.c.prediction_id)
        .where(
            feedback.c.id.in_(latest),
            feedback.c.label != predictions.c.intent,
            feedback.c.client.not_in(list(exclude_clients)),
        )
        .distinct()
    )
    with engine.connect() as conn:
        return [r.created_at for r in conn.execute(query)]


def prediction(engine: Engine, prediction_id: str) -> dict[str, Any] | None:
    """The predictions row of an id the API returned (model version, intent, confidence), or None."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(predictions).where(predictions.c.prediction_id == prediction_id).limit(1)
        ).mappings()
        return next((dict(r) for r in row), None)


def add_annotation(
    engine: Engine, prediction_id: str, annotator: str, label: str, note: str | None = None
) -> bool:
    """Record an annotator's label for a queue item; True when new (an annotator labels an item once)."""
    row = {
        "prediction_id": prediction_id,
        "annotator": annotator,
        "label": label,
        "note": note,
        "created_at": now_utc(),
    }
    with engine.begin() as conn:
        return _insert_ignore(conn, annotations, [row], ["prediction_id", "annotator"]) == 1


def add_adjudication(engine: Engine, prediction_id: str, adjudicator: str, label: str, reason: str) -> bool:
    """Record the final label for a disputed item; True when new (an item is adjudicated once)."""
    row = {
        "prediction_id": prediction_id,
        "adjudicator": adjudicator,
        "label": label,
        "reason": reason,
        "created_at": now_utc(),
    }
    with engine.begin() as conn:
        return _insert_ignore(conn, adjudications, [row], ["prediction_id"]) == 1


def prune(engine: Engine, retention_days: int, now: datetime | None = None) -> dict[str, int]:
    """Delete queue items (with their annotations and adjudications; audit and correction items alike), feedback,
    prediction ids and shadow scores older than the retention.

    Returns:
        rows deleted per table.
    """
    if retention_days < 0:
        raise UserError(
            f"retention must be 0 days or more, got {retention_days}",
            where="--days",
            fix="pass --days 0 or more",
        )
    cutoff = (now or now_utc()) - timedelta(days=retention_days)
    old_items = sa.select(review_queue.c.prediction_id).where(review_queue.c.created_at < cutoff)
    with engine.begin() as conn:
        return {
            "annotations": conn.execute(
                annotations.delete().where(annotations.c.prediction_id.in_(old_items))
            ).rowcount,
            "adjudications": conn.execute(
                adjudications.delete().where(adjudications.c.prediction_id.in_(old_items))
            ).rowcount,
            "review_queue": conn.execute(
                review_queue.delete().where(review_queue.c.created_at < cutoff)
            ).rowcount,
            "feedback": conn.execute(feedback.delete().where(feedback.c.created_at < cutoff)).rowcount,
            "predictions": conn.execute(
                predictions.delete().where(predictions.c.created_at < cutoff)
            ).rowcount,
            "shadow_scores": conn.execute(
                shadow_scores.delete().where(shadow_scores.c.created_at < cutoff)
            ).rowcount,
        }


def queue_items(engine: Engine) -> list[dict[str, Any]]:
    """Every queue item, oldest first, with top_k decoded."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(review_queue).order_by(review_queue.c.created_at, review_queue.c.id)
        ).mappings()
        items = [dict(r) for r in rows]
    for item in items:
        if isinstance(item["top_k"], str):  # JSON comes back decoded on both dialects; be lenient
            item["top_k"] = json.loads(item["top_k"])
    return items


def table_rows(engine: Engine, table: sa.Table) -> list[dict[str, Any]]:
    """All rows of a table, in insertion order."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table).order_by(table.c.id)).mappings()]


def main_upgrade(params: Any) -> tuple[int, int]:
    """`intentops db upgrade`: bring the configured database to SCHEMA_VERSION."""
    engine = engine_from_params(params)
    try:
        before, after = upgrade(engine)
    except sa.exc.OperationalError as err:
        raise UserError(
            f"cannot open the database: {err.orig}", where=_where(engine), fix=f"check ${DB_URL_ENV}"
        ) from err
    finally:
        engine.dispose()
    print(f"schema version {before} -> {after} ({_where(engine)})")
    return before, after


def main_prune(params: Any, days: int | None = None) -> dict[str, int]:
    """`intentops queue prune`: delete what is older than the retention (feedback.store.retention_days)."""
    engine = engine_from_params(params)
    try:
        check_schema(engine)
        deleted = prune(engine, int(days if days is not None else params.feedback.store.retention_days))
    finally:
        engine.dispose()
    print("deleted " + ", ".join(f"{n} {table}" for table, n in deleted.items()))
    return deleted
