"""The shadow challenger: the registry's candidate scores a sample of live texts beside the champion.

A response never waits for it and never changes: the route offers the champion's rows after they are answered
(a random draw and a deque append), a bounded queue drops what does not fit (counted), and the challenger runs
in its own thread of the replica on batches taken from the queue; its rows reach the store through a small
buffer written by the store thread. A failure (load, predict, write) is logged and counted, never raised.

Same replica, own thread (not a second deployment): at the shipped sample rate the challenger costs a few
per cent of replica CPU per request (benchmarks/serve_load.py --shadow, docs/operations.md), while a second
deployment would add a Serve handle call, a copy of every sampled text and a replica to run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from intentops.api.model import LoadedModel, candidate_of, load_candidate
from intentops.api.writer import error_text, is_transient

log = logging.getLogger("ray.serve")

Item = tuple[str, dict]  # (text, the champion's API row)
AGREEMENT_WINDOW = 1000  # the agreement gauge is over the latest this many shadowed texts
RETRY_S = 60.0  # a candidate that failed to load is tried again after this long (or when the pointer moves)


class ShadowScorer:
    """Scores sampled texts with the staged candidate and buffers (prediction id, both answers) for the store.

    Args:
        root: the project root the settings' paths start from.
        settings: returns the current settings (`shadow`, `registry`, the loading keys).
        run_io: runs a blocking function in the I/O threads (registry reads, the candidate's load).
    """

    def __init__(
        self, root: Path, settings: Callable[[], dict], run_io: Callable[..., Awaitable[Any]]
    ) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.root, self._settings, self._run_io = root, settings, run_io
        self.model: LoadedModel | None = None
        self.candidate: str | None = None  # the registry version `model` was loaded as
        self.cfg: dict[str, Any] = {"enabled": False, "sample": 0.0, "queue_max": 1000, "batch_size": 32}
        self.queue: deque[Item] = deque()  # appended by the event loop, taken by the shadow thread
        self.rows: deque[dict] = deque()  # scored, waiting for the store
        self.dropped: dict[str, int] = {}
        self._agree: deque[bool] = deque(maxlen=AGREEMENT_WINDOW)
        self._failure: tuple[str, float] | None = None  # (candidate version, when to retry)
        self._next_poll = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shadow")
        self.m_scored = Counter(
            "intentops_shadow_predictions",
            description="Texts the shadow challenger scored.",
            tag_keys=("challenger_version",),
        )
        self.m_dropped = Counter(
            "intentops_shadow_dropped",
            description="Sampled texts or scores lost: queue_full, score_error, store_full, rejected.",
            tag_keys=("reason",),
        )
        self.m_agreement = Gauge(
            "intentops_shadow_agreement",
            description=f"Share of the last {AGREEMENT_WINDOW} shadowed texts where challenger and champion agree.",
            tag_keys=("champion_version", "challenger_version"),
        )
        self.m_queue = Gauge(
            "intentops_shadow_queued", description="Sampled texts waiting for the challenger."
        )

    def configure(self, cfg: Mapping[str, Any]) -> None:
        """Apply `serving.shadow`; turned off, the challenger is unloaded and what waits is dropped."""
        self.cfg = dict(cfg)
        self._next_poll = 0.0  # look at the candidate pointer on the next tick
        if not cfg["enabled"]:
            self.model = self.candidate = None
            self.queue.clear()

    # --- the request path: a draw and an append ----------------------------------------------------------------
    def offer(self, texts: list[str], rows: list[dict]) -> None:
        """Queue a sample of a request's answered texts for the challenger (event loop; never raises)."""
        if self.model is None:
            return
        rate, room = self.cfg["sample"], self.cfg["queue_max"] - len(self.queue)
        for text, row in zip(texts, rows, strict=False):  # one row per text; never raise here
            if rate < 1.0 and random.random() >= rate:
                continue
            if room <= 0:
                self._drop("queue_full", 1)
                continue
            self.queue.append((text, row))
            room -= 1

    # --- the shadow thread -------------------------------------------------------------------------------------
    def score_queued(self) -> int:
        """Score what is queued, in batches of `batch_size` (blocking: the shadow thread); texts scored."""
        model, done = self.model, 0
        while self.queue and model is not None:
            items = [self.queue.popleft() for _ in range(min(self.cfg["batch_size"], len(self.queue)))]
            try:
                rows = score(model, items)
            except Exception as err:  # the candidate's fault: count it and carry on
                self._drop("score_error", len(items))
                log.error("shadow challenger %s failed on %d text(s): %s", model.version, len(items), err)
                continue
            self._keep(rows)
            done += len(rows)
        return done

    def _keep(self, rows: list[dict]) -> None:
        # Scores wait for the store (down or slow) up to 4 x queue_max rows; beyond, they are dropped, counted.
        room = self.cfg["queue_max"] * 4 - len(self.rows)
        if room < len(rows):
            self._drop("store_full", len(rows) - max(room, 0))
            rows = rows[: max(room, 0)]
        self.rows.extend(rows)
        for r in rows:
            self._agree.append(r["champion_intent"] == r["challenger_intent"])
        if rows:
            self.m_scored.inc(len(rows), tags={"challenger_version": rows[0]["challenger_version"]})
            self.m_agreement.set(
                sum(self._agree) / len(self._agree),
                tags={
                    "champion_version": rows[-1]["champion_version"],
                    "challenger_version": rows[-1]["challenger_version"],
                },
            )

    def write_some(self, engine: Any) -> int:
        """Store the buffered scores in one transaction (blocking: the store thread); rows written."""
        from intentops.feedback import store

        rows = list(itertools.islice(self.rows, 2000))
        if not rows:
            return 0
        try:
            with engine.begin() as conn:
                conn.execute(store.shadow_scores.insert(), rows)
        except Exception as err:
            if is_transient(err):  # the store is down or busy: keep them for the next tick
                log.warning("shadow scores not stored yet (%d waiting): %s", len(self.rows), error_text(err))
                return 0
            self._drop("rejected", len(rows))
            log.error("the store refused %d shadow score(s): %s", len(rows), error_text(err))
        for _ in rows:
            self.rows.popleft()
        return len(rows)

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.m_dropped.inc(n, tags={"reason": reason})

    # --- the loop ------------------------------------------------------------------------------------------------
    async def run(self, engine: Callable[[], Any], run_store: Callable[..., Awaitable[Any]]) -> None:
        """Every `flush_s`: follow the candidate pointer, score the queue (shadow thread), store the scores."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.get("flush_s") or 0.5)
            try:
                if self.cfg["enabled"]:
                    await self.follow()
                self.m_queue.set(len(self.queue))
                if self.queue:
                    await loop.run_in_executor(self._pool, self.score_queued)
                if self.rows and engine() is not None:
                    await run_store(self.write_some, engine())
            except Exception as err:  # the shadow must never stop the replica's other tasks
                log.error("shadow loop: %s", error_text(err))

    async def follow(self) -> None:
        """Load the candidate the registry names when it changes (verified as the champion is); none -> idle."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        s = self._settings()
        self._next_poll = now + (s["watch_interval_s"] or 5.0)
        try:
            version = await self._run_io(candidate_of, s, self.root)
        except Exception as err:
            log.warning("cannot read the registry's candidate: %s", error_text(err))
            return
        if version != self.candidate:
            self.model, self.candidate = None, None  # a superseded candidate's scores serve no promotion
            self.queue.clear()
        if version is None or self.model is not None:
            return
        if self._failure and self._failure[0] == version and now < self._failure[1]:
            return
        try:
            model = await self._run_io(load_candidate, version, s, self.root)
        except Exception as err:
            self._failure = (version, now + RETRY_S)
            what = err.render() if hasattr(err, "render") else error_text(err)
            log.error("shadow challenger %s not loaded (retry in %.0f s): %s", version, RETRY_S, what)
            return
        self._failure, self.model, self.candidate = None, model, version
        self._agree.clear()
        log.info(
            "shadowing candidate %s on %.0f%% of texts",
            model.version,
            100 * self.cfg["sample"],
            extra={"ray_serve_extra_fields": {"event": "shadow_loaded", "challenger_version": model.version}},
        )

    def status(self) -> dict[str, Any]:
        """What the replica says about its shadow (for logs and checks)."""
        return {
            "enabled": self.cfg["enabled"],
            "challenger": self.model.version if self.model else None,
            "queued": len(self.queue),
            "unstored": len(self.rows),
            "dropped": dict(self.dropped),
        }


def score(model: LoadedModel, items: list[Item]) -> list[dict]:
    """One challenger call over the items' texts: a store row (shadow_scores) per text."""
    from intentops.feedback.store import now_utc

    t0 = time.perf_counter()
    raw = model.predictor.predict([text for text, _ in items], top_k=1)
    ms = round((time.perf_counter() - t0) * 1000, 3)
    at = now_utc()
    return [
        {
            "prediction_id": row["prediction_id"],
            "champion_version": row["model_version"],
            "challenger_version": model.version,
            "champion_intent": row["intent"],
            "champion_confidence": float(row["confidence"]),
            "challenger_intent": r["intent"],
            "challenger_confidence": float(r["confidence"]),
            "challenger_ms": ms,
            "challenger_batch": len(items),
            "created_at": at,
        }
        for (_, row), r in zip(items, raw, strict=True)
    ]
