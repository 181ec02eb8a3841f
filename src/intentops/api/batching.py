"""Texts of concurrent requests pooled into model calls: @serve.batch for single texts, then a group commit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from intentops.api.model import LoadedModel

Result = tuple[dict, dict]  # (API row, facts about the model call that served it) per text
ModelCall = Callable[[LoadedModel, list[str]], tuple[list[dict], dict]]


class Batcher:
    """Pools texts into model calls: whoever gets the model next runs one call for every pending text.

    Args:
        model: returns the model to serve the next call with.
        call: one model call, (model, texts) -> (rows, facts); run in the model thread under load.
    """

    def __init__(self, model: Callable[[], LoadedModel | None], call: ModelCall) -> None:
        self._model, self._call = model, call
        self.max_batch_size = 32
        self.in_flight = 0  # predict requests being handled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="infer")  # one model call at a time
        self._lock = asyncio.Lock()
        self._pending: list[tuple[list[str], asyncio.Future]] = []

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size = max_batch_size
        self._one.set_max_batch_size(max_batch_size)
        self._one.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def predict(self, texts: list[str]) -> list[Result]:
        """(row, call facts) per text, in order."""
        self.in_flight += 1
        try:
            if len(texts) == 1:
                return [await self._one(texts[0])]
            # a list is a batch already: it joins the next model call whole, with whatever else is pending
            return await self._join(texts)
        finally:
            self.in_flight -= 1

    # max_concurrent_batches > 1: Serve closes a batch after batch_wait_timeout_s even while the model is
    # busy, so under load it forms many small batches; letting them all reach `_join` (instead of queueing
    # on Serve's semaphore) lets the next model call take every text that arrived during the last one.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=32)
    async def _one(self, texts: list[str]) -> list[Result]:
        """Single texts of concurrent requests, as Serve batched them."""
        return await self._join(texts)

    async def _join(self, texts: list[str]) -> list[Result]:
        """Group commit: queue the texts, then run the pending ones unless an earlier call already took them."""
        mine = asyncio.get_running_loop().create_future()
        self._pending.append((texts, mine))
        async with self._lock:
            if not mine.done():
                await self._run_pending()
        return await mine

    def _take(self) -> list[tuple[list[str], asyncio.Future]]:
        """Pending batches, oldest first, up to max_batch_size texts (at least one batch, however big)."""
        take, n = [], 0
        while self._pending and (not take or n + len(self._pending[0][0]) <= self.max_batch_size):
            item = self._pending.pop(0)
            take.append(item)
            n += len(item[0])
        return take

    async def _run_pending(self) -> None:
        take = self._take()
        texts = [t for batch, _ in take for t in batch]
        model = self._model()  # one model for the whole call, even mid-swap
        try:
            if self.in_flight <= 1:
                # Alone: nothing to overlap with the model call, so skip the two thread hand-offs (each a
                # wake-up that waits for a CPU on a busy host).
                rows, call = self._call(model, texts)
            else:
                # Under load: one hop to the model thread per call (model, rows, metrics, ledger write), so
                # the event loop keeps parsing the requests that will form the next call meanwhile.
                rows, call = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._call, model, texts
                )
        except Exception as err:
            for _, fut in take:
                fut.set_exception(err)
            return
        pos = 0
        for batch, fut in take:
            fut.set_result([(row, call) for row in rows[pos : pos + len(batch)]])
            pos += len(batch)
