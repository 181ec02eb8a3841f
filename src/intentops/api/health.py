"""Whether this replica can serve a prediction, and what /readyz, /v1/model and Serve's check_health say.

Readiness is a real prediction: a canary text goes through the same queue, runner, model thread and model
as requests every `health.canary_interval_s`, recorded nowhere. A canary unanswered for longer than
`health.canary_timeout_s` (or failing) means the replica cannot serve: /readyz answers 503 and Serve's
health check fails, so Serve restarts the replica. A store that is down or a model load that keeps failing
does not stop predictions: /readyz stays 200 but says `degraded`, with the reasons, so an orchestrator does
not pull every replica because the database is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from intentops.api.model import ModelSlot
from intentops.api.schemas import RequestError
from intentops.api.writer import LedgerWriter

log = logging.getLogger("ray.serve")
CANARY_TEXT = "health check"


class Unavailable(RequestError):
    """A 503 the client should retry: the response carries Retry-After."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None, retry_after_s: int = 1):
        super().__init__(503, what, where, fix)
        self.retry_after_s = retry_after_s


class Canary:
    """The canary's state: when the outstanding one was sent, and how the last one ended."""

    def __init__(self) -> None:
        self.sent_at: float | None = None  # monotonic time of the unanswered canary, None when none is out
        self.error: str | None = None  # the last canary's error, None when it answered

    def problem(self, timeout_s: float) -> str | None:
        """Why the replica cannot serve a prediction, or None."""
        if self.error is not None:
            return f"the predict canary failed: {self.error}"
        if self.sent_at is not None and time.monotonic() - self.sent_at > timeout_s:
            return f"the predict canary is unanswered after {time.monotonic() - self.sent_at:.0f} s"
        return None

    async def run(self, probe: Callable[[], Awaitable[Any]], settings: Callable[[], dict]) -> None:
        """Send a canary every canary_interval_s, one at a time; a stuck one keeps `sent_at`."""
        while True:
            await asyncio.sleep(settings()["health"]["canary_interval_s"])
            self.sent_at = time.monotonic()
            try:
                await probe()
            except Exception as err:
                if self.error is None:
                    log.error("the predict canary failed: %s", err)
                self.error = f"{type(err).__name__}: {err}"
            else:
                self.error = None
            self.sent_at = None


def readiness(slot: ModelSlot, writer: LedgerWriter, canary: Canary, settings: dict) -> tuple[int, dict]:
    """(HTTP status, body) of /readyz: 503 loading/unhealthy, else 200 ready or degraded with reasons."""
    model = slot.current
    if model is None:
        return 503, {"status": "loading", "reasons": ["no model loaded yet"]}
    problem = canary.problem(settings["health"]["canary_timeout_s"])
    if problem is not None:
        return 503, {"status": "unhealthy", "model_version": model.version, "reasons": [problem]}
    reasons = degraded_reasons(slot, writer)
    body: dict[str, Any] = {"status": "degraded" if reasons else "ready", "model_version": model.version}
    body["variant"] = model.variant
    if reasons:
        body["reasons"] = reasons
    body["store"] = store_report(writer)
    return 200, body


def degraded_reasons(slot: ModelSlot, writer: LedgerWriter) -> list[str]:
    """What works less than it should while predictions are still served."""
    reasons = []
    state = writer.state
    if writer.engine is not None and not state.ok:
        down_s = time.time() - (state.since or time.time())
        reasons.append(
            f"prediction store unavailable for {down_s:.0f} s ({state.error}); "
            f"{writer.buffered} row(s) buffered of {writer.max_rows}"
        )
    if slot.failure is not None:
        f = slot.failure
        reasons.append(
            f"model load failing ({f.attempts} attempt(s), retry in {f.report()['retry_in_s']} s): {f.error}"
        )
    return reasons


def store_report(writer: LedgerWriter) -> dict[str, Any] | None:
    """The store's part of /readyz: up or not, buffered and dropped rows (None when not recording)."""
    if writer.engine is None:
        return None
    s = writer.state
    return {"up": s.ok, "buffered": writer.buffered, "dropped": s.dropped, "rejected": s.rejected}
