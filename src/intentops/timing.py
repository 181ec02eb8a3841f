"""Latency timing shared by `train`, `export` and `promote`: one clock, one way to warm up and summarise; and
the one progress bar of long work (`progress`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np


def progress(
    iterable: Iterable | None = None,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    show: bool | None = None,
):
    """A tqdm progress bar on stderr, drawn only where stderr is a terminal: CI logs and DVC's queue stay quiet.

    Iterate it (`for x in progress(xs, "calibrate bootstrap")`), or update it by hand where the loop is inside a
    library call (`with progress(total=n, desc=...) as bar: ... bar.update(k)`).

    Args:
        desc: the bar's label; with `show` None, no label means no bar (a library loop nobody asked to show).
        show: True draws the bar anywhere, False never; None (default): only on a terminal, and only with `desc`.
    """
    from tqdm import tqdm

    # tqdm's disable=None is its own "no bar unless stderr is a TTY".
    disable = (None if desc else True) if show is None else not show
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True)


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, wall seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def latency_ms(
    call: Callable[[Any], Any], inputs: Sequence, calls: int, warmup: int, desc: str | None = None
) -> dict[str, float]:
    """p50/p95 milliseconds of `call(inputs[i])`, one input per call, after `warmup` untimed calls.

    Inputs are taken in turn (wrapping around), warm-up calls included. `desc` labels a progress bar over the
    calls (`progress`; the bar redraws between calls, outside the timed part).
    """
    times = []
    for i in progress(range(warmup + calls), desc, unit="call"):
        _, seconds = timed(call, inputs[i % len(inputs)])
        if i >= warmup:
            times.append(1000.0 * seconds)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "calls": calls,
    }
