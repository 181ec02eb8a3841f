"""Prediction ids and review-queue rows, buffered off the request path and written by one background writer.

A prediction never waits for the database: each model call's rows join a bounded buffer in memory, and a
writer loop stores them in one transaction per flush. When the store is slow, locked or down, the rows wait
in the buffer (retried with backoff) and `/readyz` says `degraded`; when the buffer is full, new rows are
dropped, counted in `intentops_store_dropped_rows` and logged, never silently. The buffer is written on
graceful shutdown and before the store changes on a redeploy.

/v1/feedback for an id that is still buffered first asks for a write now; when the store cannot take it,
the answer is 503 with Retry-After (the client retries; the id is not lost).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from intentops.feedback import ledger

log = logging.getLogger("ray.serve")

Call = tuple[list[str], list[dict]]  # (texts, API rows) of one model call
# Errors that say the store is unreachable or busy, not that the rows are bad: keep the rows and retry.
TRANSIENT = ("OperationalError", "InterfaceError", "TimeoutError", "ProgrammingError", "DisconnectionError")


@dataclass
class StoreState:
    """What /readyz and the metrics say about the store."""

    ok: bool = True
    error: str | None = None
    since: float | None = None  # wall time the store went down
    dropped: int = 0  # rows lost because the buffer was full (since start)
    rejected: int = 0  # rows the store refused as bad data (since start)


def error_text(err: BaseException) -> str:
    """The error without parameters or the statement (the engines hide parameters; the SQL is noise)."""
    orig = getattr(err, "orig", None)
    return f"{type(err).__name__}: {str(orig if orig is not None else err).splitlines()[0][:200]}"


def is_transient(err: BaseException) -> bool:
    """True when the error is the store's state (down, locked, schema missing), not the rows."""
    return type(err).__name__ in TRANSIENT or bool(getattr(err, "connection_invalidated", False))


class LedgerWriter:
    """A bounded buffer of model calls' rows and the loop that writes them.

    Args:
        max_rows: rows held at most; beyond it new rows are dropped (counted and logged).
        flush_s: how often the loop writes when the store is healthy.
        retry_max_s: the longest wait between retries while the store is failing (doubling from flush_s).
    """

    def __init__(self, max_rows: int = 10000, flush_s: float = 0.2, retry_max_s: float = 10.0) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.max_rows, self.flush_s, self.retry_max_s = max_rows, flush_s, retry_max_s
        self.engine: Any = None
        # serving.store.audit_share: texts also kept for audit labelling (ledger.in_audit)
        self.audit_share = 0.0
        self.state = StoreState()
        self._calls: deque[Call] = deque()
        self._ids: set[str] = set()
        self._rows = 0
        self._lock = threading.Lock()  # the model thread adds, the writer thread removes
        self._write_lock = threading.Lock()  # one write at a time (loop, feedback, shutdown)
        self.m_buffered = Gauge("intentops_store_buffered_rows", description="Rows waiting for the store.")
        self.m_dropped = Counter(
            "intentops_store_dropped_rows",
            description="Rows lost: the buffer was full (reason=buffer_full) or the store refused them.",
            tag_keys=("reason",),
        )
        self.m_up = Gauge("intentops_store_up", description="1 when the last write succeeded, else 0.")

    @property
    def buffered(self) -> int:
        return self._rows

    def add(self, texts: list[str], rows: list[dict]) -> None:
        """Queue one model call's rows (any thread); drop them, counted and logged, when the buffer is full."""
        with self._lock:
            if self._rows + len(rows) > self.max_rows:
                self.state.dropped += len(rows)
                full = True
            else:
                self._calls.append((texts, rows))
                self._ids.update(r["prediction_id"] for r in rows)
                self._rows += len(rows)
                full = False
        if full:
            self.m_dropped.inc(len(rows), tags={"reason": "buffer_full"})
            log.error(
                "prediction store buffer full (%d rows): %d prediction id(s) dropped, %d in total; store: %s",
                self.max_rows,
                len(rows),
                self.state.dropped,
                self.state.error,
            )

    def is_buffered(self, prediction_id: str) -> bool:
        return prediction_id in self._ids

    def _peek(self, max_rows: int = 2000) -> list[Call]:
        with self._lock:
            out, n = [], 0
            for call in self._calls:
                if out and n + len(call[1]) > max_rows:
                    break
                out.append(call)
                n += len(call[1])
            return out

    def _remove(self, calls: Sequence[Call]) -> None:
        with self._lock:
            for _ in calls:
                _, rows = self._calls.popleft()
                self._ids.difference_update(r["prediction_id"] for r in rows)
                self._rows -= len(rows)

    def write_some(self) -> int:
        """Write the oldest buffered calls in one transaction (blocking; a writer thread); rows written.

        Raises the store's error when it is down (the rows stay buffered). Rows the store refuses as bad
        data are retried one call at a time and only the call at fault is dropped.
        """
        with self._write_lock:
            calls = self._peek()
            if not calls or self.engine is None:
                return 0
            try:
                ledger.record_calls(self.engine, calls, self.audit_share)
            except Exception as err:
                if is_transient(err):
                    self._mark(False, err)
                    raise
                self._write_one_by_one(calls)
            self._remove(calls)
            self._mark(True)
            return sum(len(rows) for _, rows in calls)

    def _write_one_by_one(self, calls: Sequence[Call]) -> None:
        for call in calls:
            try:
                ledger.record_calls(self.engine, [call], self.audit_share)
            except Exception as err:
                if is_transient(err):
                    self._mark(False, err)
                    raise
                self.state.rejected += len(call[1])
                self.m_dropped.inc(len(call[1]), tags={"reason": "rejected"})
                log.error("the store refused %d prediction row(s): %s", len(call[1]), error_text(err))

    def _mark(self, ok: bool, err: BaseException | None = None) -> None:
        if ok and not self.state.ok:
            log.warning(
                "prediction store is back after %.1f s", time.time() - (self.state.since or time.time())
            )
        if not ok and self.state.ok:
            log.error("prediction store unavailable, buffering predictions: %s", error_text(err))
        self.state.ok = ok
        self.state.error = None if ok else error_text(err)
        self.state.since = None if ok else (self.state.since or time.time())
        self.m_up.set(1 if ok else 0)

    def flush(self, deadline_s: float = 10.0) -> int:
        """Write everything buffered (blocking), until done, the store fails, or the deadline; rows left."""
        end = time.monotonic() + deadline_s
        while self._rows and time.monotonic() < end:
            try:
                if not self.write_some():
                    break
            except Exception:
                break
        if self._rows:
            log.error(
                "%d prediction row(s) could not be written before shutdown: %s", self._rows, self.state.error
            )
        return self._rows

    async def run(self, run_in_thread: Callable[..., Awaitable[Any]]) -> None:
        """Write every flush_s; after a failure wait twice as long each time, up to retry_max_s."""
        delay = self.flush_s
        while True:
            await asyncio.sleep(delay)
            self.m_buffered.set(self._rows)
            if await self.write_now(run_in_thread):
                delay = self.flush_s
            else:
                delay = min(max(delay, self.flush_s) * 2, self.retry_max_s)

    async def write_now(self, run_in_thread: Callable[..., Awaitable[Any]]) -> bool:
        """Write the buffer until it is empty (the loop, and /v1/feedback on a buffered id); False when the
        store failed (the rows stay buffered)."""
        try:
            while self._rows and await run_in_thread(self.write_some):
                pass
        except Exception:
            return False
        return True
