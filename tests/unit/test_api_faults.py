"""The API's fault isolation, below Serve's HTTP layer: the batcher and the store writer, on real asyncio and SQLite.

The model call is a plain function here (the batcher's contract); the store is a real SQLite file, locked by a
second connection the way a long `intentops label` transaction would hold it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid

import pytest

from intentops.api.batching import Batcher
from intentops.api.middleware import app_path
from intentops.api.writer import LedgerWriter
from intentops.feedback import store


def fake_call(calls: list[list[str]], gate: threading.Event | None = None):
    """A model call that records its texts, optionally waits on `gate`, and raises on a text holding "BAD"."""

    def call(model, texts, record):
        calls.append(list(texts))
        if gate is not None:
            gate.wait(5)
        if any("BAD" in t for t in texts):
            raise ValueError("the model cannot encode this text")
        rows = [{"text": t, "record": record} for t in texts]
        return rows, {"batch_size": len(texts)}

    return call


def test_a_bad_text_fails_only_its_own_request():
    """Texts of four requests share one call; the call raises; each request is retried alone, one fails."""
    calls: list[list[str]] = []
    batcher = Batcher(lambda: "model", fake_call(calls))

    async def run():
        batcher.in_flight = 2  # as under load: the call goes to the model thread
        return await asyncio.gather(
            batcher._join(["a1", "a2"]),
            batcher._join(["BAD b"]),
            batcher._join(["c1", "c2", "c3"]),
            batcher._join(["d"]),
            return_exceptions=True,
        )

    a, b, c, d = asyncio.run(run())
    assert isinstance(b, ValueError)
    assert [r["text"] for r, _ in a] == ["a1", "a2"]
    assert [r["text"] for r, _ in c] == ["c1", "c2", "c3"] and [r["text"] for r, _ in d] == ["d"]
    # one pooled call, then one call per request
    assert calls[0] == ["a1", "a2", "BAD b", "c1", "c2", "c3", "d"] and len(calls) == 5


def test_a_client_that_hangs_up_strands_nobody():
    """Requests cancelled while their call runs (clients gone) cost only their own wait: the others get their
    rows, later requests are served, and the cancelled ones are skipped by the next call."""
    calls: list[list[str]] = []
    gate = threading.Event()
    batcher = Batcher(lambda: "model", fake_call(calls, gate))

    async def run():
        batcher.in_flight = 2
        first = asyncio.ensure_future(batcher._join(["x1"]))
        await asyncio.sleep(0.05)  # the runner took x1 and waits on the gate
        gone = [asyncio.ensure_future(batcher._join([f"gone{i}"])) for i in range(3)]
        stays = asyncio.ensure_future(batcher._join(["stays"]))
        await asyncio.sleep(0.05)
        first.cancel()  # its client hung up mid-call
        gone[0].cancel()
        gone[1].cancel()  # hung up while still queued
        await asyncio.sleep(0.05)
        gate.set()
        kept = await asyncio.wait_for(stays, 5)
        later = await asyncio.wait_for(batcher._join(["later"]), 5)
        return kept, later, await asyncio.wait_for(gone[2], 5)

    kept, later, last = asyncio.run(run())
    assert [r["text"] for r, _ in kept] == ["stays"] and [r["text"] for r, _ in later] == ["later"]
    assert [r["text"] for r, _ in last] == ["gone2"]
    assert ["gone0"] not in calls and all("gone0" not in c and "gone1" not in c for c in calls)


def test_the_canary_is_predicted_but_never_recorded():
    calls: list[list[str]] = []
    batcher = Batcher(lambda: "model", fake_call(calls))

    async def run():
        return await asyncio.gather(batcher.probe("health check"), batcher._join(["real"]))

    canary, real = asyncio.run(run())
    assert canary[0][0]["record"] is False and real[0][0]["record"] is True
    assert calls == [["health check"], ["real"]]  # never pooled with requests


def test_a_batch_wait_pools_texts_that_arrive_within_it_and_a_full_call_does_not_wait():
    """batching.batch_wait_timeout_s: single texts sent 10 ms apart share a call when the wait is 0.5 s; with
    max_batch_size of them pending, the call starts at once (well before the wait is over)."""
    calls: list[list[str]] = []
    batcher = Batcher(lambda: "model", fake_call(calls))

    async def trickle(n: int) -> float:
        start = time.monotonic()
        tasks = []
        for i in range(n):
            tasks.append(asyncio.ensure_future(batcher.predict([f"t{len(calls)}-{i}"])))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return time.monotonic() - start

    batcher.configure(4, 0.5)
    full = asyncio.run(trickle(4))
    assert [len(c) for c in calls] == [4] and full < 0.4, (calls, full)
    calls.clear()
    batcher.configure(8, 0.5)
    asyncio.run(trickle(3))
    assert [len(c) for c in calls] == [3], calls  # not full: the three waited for each other
    calls.clear()
    batcher.configure(8, 0.0)
    asyncio.run(trickle(3))
    assert [len(c) for c in calls] == [1, 1, 1], calls  # no wait: each text is served as it comes


def rows_for(texts: list[str], needs_review: bool = True) -> list[dict]:
    return [
        {
            "prediction_id": str(uuid.uuid4()),
            "model_version": "m-test",
            "intent": "card_arrival",
            "confidence": 0.4,
            "top_k": [{"intent": "card_arrival", "confidence": 0.4}],
            "reason": "low_confidence" if needs_review else None,
            "needs_review": needs_review,
        }
        for _ in texts
    ]


@pytest.fixture
def sqlite_store(tmp_path):
    db = tmp_path / "queue.db"
    engine = store.make_engine(f"sqlite:///{db}", busy_timeout_ms=200, statement_timeout_ms=200)
    store.upgrade(engine)
    yield db, engine
    engine.dispose()


def stored_ids(engine) -> set[str]:
    return {r["prediction_id"] for r in store.table_rows(engine, store.predictions)}


def test_a_locked_store_keeps_the_rows_until_it_is_back(sqlite_store, caplog):
    """While another connection holds an exclusive lock, writes fail fast, the rows stay buffered and the store
    is reported down without the texts; after the lock, every id and queue item is stored."""
    db, engine = sqlite_store
    writer = LedgerWriter(max_rows=100)
    writer.engine = engine
    secret = "my secret card number 4242"
    calls = [([secret, "b"], rows_for([secret, "b"])), (["c"], rows_for(["c"], needs_review=False))]
    lock = sqlite3.connect(db, timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        for texts, rows in calls:
            writer.add(texts, rows)
        start = time.monotonic()
        with pytest.raises(Exception) as err:
            writer.write_some()
        assert time.monotonic() - start < 2.0  # the timeout, not a 30 s busy wait
        assert secret not in str(err.value) and secret not in caplog.text
        assert not writer.state.ok and "locked" in writer.state.error and writer.buffered == 3
        assert writer.is_buffered(calls[0][1][0]["prediction_id"])
    finally:
        lock.rollback()
        lock.close()
    assert writer.write_some() == 3 and writer.state.ok and writer.buffered == 0
    assert stored_ids(engine) == {r["prediction_id"] for _, rows in calls for r in rows}
    assert {i["text"] for i in store.queue_items(engine)} == {secret, "b"}


def test_a_full_buffer_counts_what_it_drops(sqlite_store, caplog):
    _, engine = sqlite_store
    writer = LedgerWriter(max_rows=3)
    writer.engine = engine
    writer.add(["a", "b"], rows_for(["a", "b"]))
    writer.add(["c", "d"], rows_for(["c", "d"]))  # 2 + 2 > 3: dropped whole, counted, logged
    assert (writer.buffered, writer.state.dropped) == (2, 2)
    assert "buffer full" in caplog.text
    assert writer.flush() == 0 and len(stored_ids(engine)) == 2


def test_rows_the_store_refuses_are_dropped_one_call_at_a_time(sqlite_store):
    """A bad row (here a NULL intent) fails its own call's rows only; the other calls are stored."""
    _, engine = sqlite_store
    writer = LedgerWriter()
    writer.engine = engine
    good1, bad, good2 = rows_for(["a"]), rows_for(["b"]), rows_for(["c"])
    bad[0]["intent"] = None
    for texts, rows in ((["a"], good1), (["b"], bad), (["c"], good2)):
        writer.add(texts, rows)
    writer.write_some()
    assert stored_ids(engine) == {good1[0]["prediction_id"], good2[0]["prediction_id"]}
    assert writer.state.rejected == 1 and writer.state.ok and writer.buffered == 0


@pytest.mark.parametrize(
    ("path", "root", "inside"),
    [
        ("/readyz", "", "/readyz"),
        ("/pg/readyz", "/pg", "/readyz"),
        ("/pg", "/pg", "/"),
        ("/x/v1/a", "/y", "/x/v1/a"),
    ],
)
def test_routes_are_matched_inside_the_app_route_prefix(path, root, inside):
    """An app served under a route prefix (Serve's root_path) keeps its open probes and fixed metric tags."""
    assert app_path({"path": path, "root_path": root}) == inside


def test_readiness_says_what_works_and_what_does_not():
    """503 without a model or with a stuck canary; 200 degraded (with reasons) while the store is down."""
    from types import SimpleNamespace

    from intentops.api.health import Canary, readiness

    settings = {"health": {"canary_timeout_s": 5.0}}
    writer = LedgerWriter()
    slot = SimpleNamespace(current=None, failure=None)
    canary = Canary()
    assert readiness(slot, writer, canary, settings)[0] == 503
    variant = {"requested": "fp32", "served": "fp32", "reason": None}
    slot.current = SimpleNamespace(version="m-1", variant=variant)
    assert readiness(slot, writer, canary, settings) == (
        200,
        {"status": "ready", "model_version": "m-1", "variant": variant, "store": None},
    )
    writer.engine = object()
    writer.state.ok, writer.state.error, writer.state.since = (
        False,
        "OperationalError: database is locked",
        time.time(),
    )
    status, body = readiness(slot, writer, canary, settings)
    assert status == 200 and body["status"] == "degraded" and "database is locked" in body["reasons"][0]
    canary.sent_at = time.monotonic() - 6  # a canary unanswered for 6 s
    status, body = readiness(slot, writer, canary, settings)
    assert (status, body["status"]) == (503, "unhealthy") and "unanswered" in body["reasons"][0]
