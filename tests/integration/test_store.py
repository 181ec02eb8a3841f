"""The feedback store on a real SQLite file and a real, throwaway PostgreSQL server."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from intentops.errors import UserError
from intentops.feedback import store
from support import free_port

PG_BIN = Path(os.environ.get("INTENTOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server in a temp dir, reachable only through a unix socket in that dir."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (set INTENTOPS_PG_BIN)")
    run_as: dict = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix="iopg-"))  # short: a unix socket path is limited to ~107 bytes
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    data, port = root / "data", free_port()

    def pg(*args: str) -> None:
        subprocess.run(
            [str(PG_BIN / args[0]), *args[1:]], check=True, capture_output=True, cwd=root, **run_as
        )

    try:
        pg("initdb", "-D", str(data), "-U", "intentops", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses='' -k {root} -p {port} -c fsync=off -c max_connections=100"
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-o", opts, "-w", "-t", "60", "start")
        yield f"postgresql+psycopg://intentops@/postgres?host={root}&port={port}"
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An empty database of each kind, with a pool big enough for 32 threads."""
    if request.param == "sqlite":
        eng = store.make_engine(f"sqlite:///{tmp_path / 'queue.db'}", pool_size=32, max_overflow=0)
    else:
        url = request.getfixturevalue("postgres_url")
        name = f"t_{os.getpid()}_{random.randrange(10**9)}"
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        eng = store.make_engine(url.replace("/postgres?", f"/{name}?"), pool_size=32, max_overflow=0)
    yield eng
    eng.dispose()


def item(pid: str, created_at: datetime | None = None) -> dict:
    return {
        "prediction_id": pid,
        "text": f"my card has not arrived ({pid})",
        "model_version": "v1",
        "suggested_intent": "card_arrival",
        "top_k": [
            {"intent": "card_arrival", "score": 0.41},
            {"intent": "card_delivery_estimate", "score": 0.38},
        ],
        "confidence": 0.41,
        "reason": "low_confidence",
        **({"created_at": created_at} if created_at else {}),
    }


def test_schema_is_created_only_by_upgrade(engine):
    with pytest.raises(UserError, match="schema is version 0"):
        store.check_schema(engine)
    assert sa.inspect(engine).get_table_names() == []  # nothing created implicitly
    assert store.upgrade(engine) == (0, store.SCHEMA_VERSION)
    assert store.upgrade(engine) == (store.SCHEMA_VERSION, store.SCHEMA_VERSION)  # idempotent
    store.check_schema(engine)
    assert {"schema_version", "review_queue", "feedback", "annotations", "adjudications"} <= set(
        sa.inspect(engine).get_table_names()
    )


def test_writes_are_idempotent(engine):
    store.upgrade(engine)
    assert store.enqueue(engine, [item("p1"), item("p2")]) == 2
    assert store.enqueue(engine, [item("p1"), item("p3")]) == 1
    assert [i["prediction_id"] for i in store.queue_items(engine)] == ["p1", "p2", "p3"]
    assert store.queue_items(engine)[0]["top_k"][1]["intent"] == "card_delivery_estimate"

    assert store.add_feedback(engine, "p1", "card_delivery_estimate", "agent-7", feedback_id="f-1") is True
    assert store.add_feedback(engine, "p1", "card_delivery_estimate", "agent-7", feedback_id="f-1") is False
    assert store.add_annotation(engine, "p1", "ann", "card_arrival") is True
    assert store.add_annotation(engine, "p1", "ann", "card_arrival") is False
    assert store.add_adjudication(engine, "p1", "lead", "card_arrival", "rule 5") is True
    assert store.add_adjudication(engine, "p1", "lead", "card_arrival", "rule 5") is False
    for table in (store.feedback, store.annotations, store.adjudications):
        assert len(store.table_rows(engine, table)) == 1


def shadow_row(prediction_id: str, at: datetime) -> dict:
    """A shadow_scores row (the shadow challenger's score of one prediction) created at `at`."""
    return {
        "prediction_id": prediction_id,
        "champion_version": "m-1",
        "challenger_version": "m-2",
        "champion_intent": "card_arrival",
        "champion_confidence": 0.9,
        "challenger_intent": "card_arrival",
        "challenger_confidence": 0.8,
        "challenger_ms": 5.0,
        "challenger_batch": 1,
        "created_at": at,
    }


def test_prune_deletes_only_what_is_past_retention(engine):
    store.upgrade(engine)
    now = datetime.now(UTC)
    store.enqueue(engine, [item("old", now - timedelta(days=100)), item("new", now - timedelta(days=1))])
    store.add_annotation(engine, "old", "ann", "card_arrival")
    store.add_annotation(engine, "new", "ann", "card_arrival")
    store.add_feedback(engine, "old", "card_arrival", "agent", created_at=now - timedelta(days=100))
    store.add_feedback(engine, "new", "card_arrival", "agent")
    with engine.begin() as conn:
        conn.execute(
            store.shadow_scores.insert(),
            [shadow_row("old", now - timedelta(days=100)), shadow_row("new", now)],
        )
    deleted = store.prune(engine, retention_days=90)
    assert deleted == {
        "annotations": 1,
        "adjudications": 0,
        "review_queue": 1,
        "feedback": 1,
        "predictions": 0,
        "shadow_scores": 1,
    }
    assert [i["prediction_id"] for i in store.queue_items(engine)] == ["new"]
    assert [r["prediction_id"] for r in store.table_rows(engine, store.shadow_scores)] == ["new"]
    assert [r["prediction_id"] for r in store.table_rows(engine, store.annotations)] == ["new"]
    assert [r["prediction_id"] for r in store.table_rows(engine, store.feedback)] == ["new"]


def test_concurrent_feedback_is_stored_exactly_once(engine):
    """1,000 distinct corrections, each posted twice, from 32 threads in a shuffled order."""
    store.upgrade(engine)
    posts = [(f"pred-{i}", f"fb-{i}") for i in range(1000)] * 2
    random.Random(0).shuffle(posts)

    def post(p: tuple[str, str]) -> bool:
        return store.add_feedback(engine, p[0], "card_arrival", "agent", feedback_id=p[1])

    with ThreadPoolExecutor(max_workers=32) as pool:
        inserted = list(pool.map(post, posts))
    assert sum(inserted) == 1000  # every id inserted by exactly one of its two posts
    rows = store.table_rows(engine, store.feedback)
    assert len(rows) == 1000
    assert {r["feedback_id"] for r in rows} == {f"fb-{i}" for i in range(1000)}
