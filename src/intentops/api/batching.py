"""Texts of concurrent requests pooled into model calls by one runner task."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from intentops.api.model import LoadedModel

Result = tuple[dict, dict]  # (API row, facts about the model call that served it) per text
ModelCall = Callable[[LoadedModel, list[str], bool], tuple[list[dict], dict]]


@dataclass(eq=False)
class Pending:
    """Texts waiting for a model call, and the future their request awaits."""

    texts: list[str]
    future: asyncio.Future
    record: bool = True  # False for the health canary: predicted, never recorded


def settle(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a request's future unless it is done already (its client hung up: it was cancelled)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class Batcher:
    """Pools texts into model calls: one runner task runs a call for every pending text, again and again.

    Requests only queue their texts and await their future; the runner is a task of its own, so a request
    whose client hangs up (Serve cancels its task) never cancels a model call that other requests share,
    and every future taken into a call is resolved on every path.

    Args:
        model: returns the model to serve the next call with.
        call: one model call, (model, texts, record) -> (rows, facts); run in the model thread under load.
    """

    def __init__(self, model: Callable[[], LoadedModel | None], call: ModelCall) -> None:
        self._model, self._call = model, call
        self.max_batch_size = 32
        self.wait_s = 0.0
        self.in_flight = 0  # predict requests being handled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="infer")  # one model call at a time
        self._pending: deque[Pending] = deque()
        self._pending_texts = 0
        self._full: asyncio.Future | None = None  # a batch wait's: done when the pending texts fill a call
        self._runner: asyncio.Task | None = None

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Texts per model call, and how long a call waits for more texts when fewer are pending (s)."""
        self.max_batch_size, self.wait_s = max_batch_size, batch_wait_timeout_s

    async def predict(self, texts: list[str]) -> list[Result]:
        """(row, call facts) per text, in order; a list joins the next model call whole."""
        self.in_flight += 1
        try:
            return await self._join(texts)
        finally:
            self.in_flight -= 1

    async def probe(self, text: str) -> list[Result]:
        """A prediction through the same queue, runner, model thread and model, recorded nowhere (canary)."""
        return await self._join([text], record=False)

    async def _join(self, texts: list[str], record: bool = True) -> list[Result]:
        """Queue the texts, make sure the runner runs, and wait for this request's rows."""
        loop = asyncio.get_running_loop()
        item = Pending(texts, loop.create_future(), record)
        self._pending.append(item)
        self._pending_texts += len(texts)
        if self._pending_texts >= self.max_batch_size and self._full is not None:
            settle(self._full)
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await item.future

    def _take(self) -> list[Pending]:
        """Pending requests, oldest first, up to max_batch_size texts (at least one, however big), all
        recorded or all not; requests whose clients hung up are dropped here."""
        take: list[Pending] = []
        n = 0
        queue = self._pending
        while queue and (not take or n + len(queue[0].texts) <= self.max_batch_size):
            if take and queue[0].record != take[0].record:
                break
            item = queue.popleft()
            self._pending_texts -= len(item.texts)
            if not item.future.done():
                take.append(item)
                n += len(item.texts)
        return take

    async def _run(self) -> None:
        """Model calls until nothing is pending; whatever happens, every future it took is resolved."""
        while self._pending:
            await self._wait_for_more()
            take = self._take()
            if not take:
                continue
            try:
                await self._serve(take)
            except BaseException as err:  # the runner itself cancelled (shutdown): fail its requests
                for item in take:
                    settle(item.future, error=RuntimeError(f"model call interrupted: {err!r}"))
                raise

    async def _wait_for_more(self) -> None:
        """With a batch wait: until a call's worth of texts is pending or the wait is over."""
        if self.wait_s and self._pending_texts < self.max_batch_size:
            self._full = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._full, self.wait_s)
            except TimeoutError:
                pass
            finally:
                self._full = None

    async def _serve(self, take: list[Pending]) -> None:
        """One call for every taken request; if it raises, one call per request, so only the one at fault fails."""
        model = self._model()  # one model for the whole call, even mid-swap
        try:
            rows, call = await self._invoke(model, [t for item in take for t in item.texts], take[0].record)
        except Exception as err:
            if len(take) == 1:
                settle(take[0].future, error=err)
                return
            for item in take:
                await self._serve([item])
            return
        pos = 0
        for item in take:
            settle(item.future, [(row, call) for row in rows[pos : pos + len(item.texts)]])
            pos += len(item.texts)

    async def _invoke(self, model: LoadedModel, texts: list[str], record: bool) -> tuple[list[dict], dict]:
        if self.in_flight <= 1:
            # Alone: nothing to overlap with the model call, so skip the two thread hand-offs (each a
            # wake-up that waits for a CPU on a busy host).
            return self._call(model, texts, record)
        # Under load: one hop to the model thread per call (model, rows, metrics), so the event loop keeps
        # parsing the requests that will form the next call meanwhile.
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, model, texts, record)
