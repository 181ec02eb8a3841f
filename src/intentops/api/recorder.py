"""What one model call leaves behind: its metrics, the ledger write, and profile features for drift checks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from intentops.api.model import LoadedModel
from intentops.api.schemas import shape_predictions
from intentops.api.writer import LedgerWriter, is_transient
from intentops.errors import UserError
from intentops.feedback import ledger

log = logging.getLogger("ray.serve")

Batch = tuple[list[str], list[dict], str | None]  # (texts, API rows, served variant) of one model call


class ProfileSink:
    """whylogs profiles of the served texts' features (never the text), built off the request path.

    The model thread appends each call's texts and rows; a timer takes them, profiles their features in an I/O
    thread and closes a window when it is due. Each window is tagged with the model version and served variant
    of its rows; when one closes, the gauge `intentops_estimated_accuracy` (tag model_version) gets its
    label-free accuracy estimate (monitor/performance.py, with the val statistics stored in vocab.json).
    """

    def __init__(self) -> None:
        self.writer: Any = None
        self.vocab: frozenset[str] | None = None
        self.performance: dict | None = None  # val statistics of the accuracy estimate (from vocab.json)
        self.gauge: Any = None
        self._pending: deque[Batch] = deque()  # appended by the model thread

    def add(self, texts: list[str], rows: list[dict], variant: str | None = None) -> None:
        if self.writer is not None:
            self._pending.append((texts, rows, variant))

    def open(self, monitoring: Mapping[str, Any], root: Path) -> None:
        """Write what the old window holds, then profile to `monitoring` (serving.monitoring), if enabled."""
        from intentops.monitor.profiles import ProfileWindowWriter, read_performance_stats, read_vocab

        self.flush_pending()
        m = monitoring
        self.writer = self.vocab = None
        if not m["enabled"]:
            return
        vocab = m["vocab"] if "://" in m["vocab"] else str(root / m["vocab"])
        try:
            self.vocab = read_vocab(vocab)
        except UserError as err:
            log.warning("monitoring profiles off: %s", err.render())
            return
        self.performance = read_performance_stats(vocab)
        profiles = m["profiles"] if "://" in m["profiles"] else str(root / m["profiles"])
        self.writer = ProfileWindowWriter(
            profiles,
            max_rows=m["window_max_rows"],
            max_seconds=m["window_max_seconds"],
            on_close=self.window_closed,
        )

    def window_closed(self, path: str, view: Any) -> None:
        """Set the estimated-accuracy gauge from the window just written."""
        from intentops.monitor.performance import estimate_view

        est = estimate_view(view, self.performance)
        if est is None:
            return
        if self.gauge is None:
            from ray.serve.metrics import Gauge

            self.gauge = Gauge(
                "intentops_estimated_accuracy",
                description="Label-free accuracy estimate of the last closed profile window.",
                tag_keys=("model_version",),
            )
        version = (view.metadata or {}).get("model_version") or "unknown"
        self.gauge.set(est["estimated_accuracy"], tags={"model_version": version})
        log.info("window %s: estimated accuracy %.4f (%s)", path, est["estimated_accuracy"], est["method"])

    def take(self) -> list[Batch]:
        pending, queue = [], self._pending
        while queue:  # popleft is atomic: a row the model thread appends meanwhile waits for the next flush
            pending.append(queue.popleft())
        return pending

    def write(self, pending: list[Batch]) -> None:
        """Profile the buffered rows' features (the texts are dropped here) and close a due window."""
        from intentops.monitor.features import utterance_features

        if self.writer is None:
            return
        try:
            for meta, texts, rows in _by_model(pending):
                preds = [
                    {
                        "intent": r["intent"],
                        "confidence": r["confidence"],
                        "top_k": ledger.store_top_k(r),
                        "reason": r.get("reason"),
                    }
                    for r in rows
                ]
                self.writer.log(utterance_features(texts, self.vocab, preds), meta)
            self.writer.roll_if_due()
        except Exception as err:  # monitoring must never take the API down
            log.error("profile window write failed: %s", err)

    def flush_pending(self) -> None:
        self.write(self.take())

    async def run(self, flush_s: Callable[[], float], run_io: Callable[..., Awaitable[Any]]) -> None:
        """Every `flush_s()` seconds, profile what the model calls left (in an I/O thread)."""
        while True:
            await asyncio.sleep(flush_s() or 5.0)
            await run_io(self.write, self.take())

    def close(self) -> None:
        self.flush_pending()
        if self.writer is not None:
            self.writer.flush()


def _by_model(pending: list[Batch]) -> list[tuple[dict, list[str], list[dict]]]:
    """Consecutive batches grouped by (model_version, variant): a window holds one model's rows."""
    groups: list[tuple[dict, list[str], list[dict]]] = []
    for texts, rows, variant in pending:
        for text, row in zip(texts, rows, strict=True):
            meta = {"model_version": row.get("model_version"), "variant": variant}
            if not groups or groups[-1][0] != meta:
                groups.append((meta, [], []))
            groups[-1][1].append(text)
            groups[-1][2].append(row)
    return groups


class Recorder:
    """Runs one model call and records it: metrics, profile features, and its rows for the store's writer."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter as MetricCounter
        from ray.serve.metrics import Histogram

        self.writer = LedgerWriter()  # the feedback store's writer; its engine is None when not recording
        self.profiles = ProfileSink()
        self.m_predictions = MetricCounter(
            "intentops_predictions",
            description="Predictions by intent.",
            tag_keys=("intent", "model_version"),
        )
        self.m_review = MetricCounter(
            "intentops_needs_review",
            description="Predictions flagged needs_review, by reason (out_of_distribution is out_of_scope).",
            tag_keys=("reason", "model_version"),
        )
        self.m_confidence = Histogram(
            "intentops_confidence",
            description="Top-1 confidence.",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
            tag_keys=("model_version",),
        )
        self.m_batch = Histogram(
            "intentops_batch_size",
            description="Texts per model call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )

    def open_store(self, store_settings: Mapping[str, Any], params: Any, root: Path) -> None:
        """Write what is buffered, then record to `serving.store` (nothing when record_predictions is off).

        A store that cannot be reached now is not fatal: the replica starts degraded and the writer retries.
        A store without the schema (`intentops db upgrade` not run) is, with the fix.
        """
        from intentops.feedback import store

        w, s = self.writer, store_settings
        w.flush(deadline_s=s["timeout_s"] * 2)
        if w.engine is not None:
            w.engine.dispose()
        w.engine = None
        w.max_rows, w.flush_s, w.retry_max_s = s["buffer_max_rows"], s["flush_s"], s["retry_max_s"]
        w.audit_share = s["audit_share"]
        if not s["record_predictions"]:
            return
        engine = store.engine_from_params(params, root / s["db"], timeout_s=s["timeout_s"])
        try:
            store.check_schema(engine)  # fail at start, with the fix, unless `intentops db upgrade` ran
        except UserError as err:
            if not is_transient(err.__cause__ or err):
                raise
            log.error("prediction store unavailable at start, buffering: %s", err.what)
            w.state.ok, w.state.error = False, err.what
        w.engine = engine

    def call(
        self, model: LoadedModel, texts: list[str], top_k: int, record: bool = True
    ) -> tuple[list[dict], dict]:
        """One model call (in the model thread): rows with ids, then metrics, profile features, store rows.

        `record=False` (the health canary) predicts only. The rows reach the store through the writer's
        buffer, off the request path: /v1/feedback writes the buffer first when it meets a buffered id.
        """
        t0, cpu0 = time.perf_counter(), time.thread_time()
        rows = shape_predictions(model.predictor.predict(texts, top_k=top_k), model.version)
        t1, cpu1 = time.perf_counter(), time.thread_time()
        if record:
            self._observe(model.version, rows)
            self.profiles.add(texts, rows, model.variant.get("served"))
            if self.writer.engine is not None:
                self.writer.add(texts, rows)
        t2 = time.perf_counter()
        return rows, {
            "batch_size": len(rows),
            "model_ms": round((t1 - t0) * 1000, 2),
            # CPU of this thread: the whole model at one ONNX Runtime thread (which runs on the caller's)
            "model_cpu_ms": round((cpu1 - cpu0) * 1000, 2),
            "record_ms": round((t2 - t1) * 1000, 2),
        }

    def _observe(self, version: str, rows: list[dict]) -> None:
        """Metrics for one model call, counted per call (one increment per intent and per reason)."""
        self.m_batch.observe(len(rows))
        for intent, n in Counter(r["intent"] for r in rows).items():
            self.m_predictions.inc(n, tags={"intent": intent, "model_version": version})
        for reason, n in Counter(r["reason"] for r in rows if r["reason"] is not None).items():
            self.m_review.inc(n, tags={"reason": reason, "model_version": version})
        tags = {"model_version": version}
        for r in rows:
            self.m_confidence.observe(r["confidence"], tags=tags)
