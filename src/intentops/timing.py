"""Latency timing shared by `train`, `export` and `promote`: one clock, one way to warm up and summarise."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, wall seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def latency_ms(call: Callable[[Any], Any], inputs: Sequence, calls: int, warmup: int) -> dict[str, float]:
    """p50/p95 milliseconds of `call(inputs[i])`, one input per call, after `warmup` untimed calls.

    Inputs are taken in turn (wrapping around), warm-up calls included.
    """
    times = []
    for i in range(warmup + calls):
        _, seconds = timed(call, inputs[i % len(inputs)])
        if i >= warmup:
            times.append(1000.0 * seconds)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "calls": calls,
    }
