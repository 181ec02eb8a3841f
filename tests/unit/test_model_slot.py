"""The replica's model slot (intentops.api.model.ModelSlot) following a registry pointer, on real asyncio, a real
local registry and real tiny ONNX bundles; no Ray cluster (Serve's metrics work without one).

The case that matters: a poll sees the pointer move, but the reload it starts resolves an older pointer (a read
that lands before the write, a retried read on another connection); the slot then serves the old version while
believing it saw the move. The watch must converge on the pointer at its next poll, not wait for the next move.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from support import ROOT, write_tiny_onnx_bundle

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]


def _registry(tmp: Path) -> tuple[Path, dict[str, str]]:
    from intentops.inference.registry import Registry

    registry, versions = tmp / "registry", {}
    for name, confident in (("A", True), ("B", False)):
        versions[name] = write_tiny_onnx_bundle(tmp / "bundles" / name, LABELS, confident)
        Registry.at(registry).add(tmp / "bundles" / name, versions[name])
    return registry, versions


def _slot(registry: Path):
    from intentops.api.model import ModelSlot
    from intentops.api.settings import load_settings

    settings, _ = load_settings(
        ROOT,
        {"bundle": "production", "registry": str(registry), "watch_interval_s": 0.05, "num_threads": 1},
    )

    async def run_io(fn, *args):
        return await asyncio.to_thread(fn, *args)

    return ModelSlot(ROOT, lambda: settings, run_io), settings


async def _until(check, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return False


def point(registry: Path, version: str) -> None:
    (registry / "production").write_text(version + "\n")


def test_watch_follows_moves_and_converges_after_a_stale_reload(tmp_path, monkeypatch):
    import intentops.api.model as model_mod

    registry, v = _registry(tmp_path)
    point(registry, v["A"])
    slot, settings = _slot(registry)
    real_resolve = model_mod.resolve_bundle
    stale: list[str] = []  # versions the next resolves report instead of the pointer (one read each)

    def resolve(s, root):
        if stale:  # the pointer as an earlier read saw it
            version = stale.pop(0)
            return (registry / version).resolve(), version
        return real_resolve(s, root)

    monkeypatch.setattr(model_mod, "resolve_bundle", resolve)

    async def scenario() -> list[str]:
        await slot.apply(settings, {})
        seen = [slot.current.version]
        watch = asyncio.create_task(slot.watch())
        try:
            point(registry, v["B"])  # a move: followed
            assert await _until(lambda: slot.current.version == v["B"]), "the move to B was not followed"
            seen.append(slot.current.version)
            stale.append(v["B"])  # the rollback's reload resolves the old pointer once ...
            point(registry, v["A"])
            assert await _until(lambda: not stale), "the watch did not reload after the rollback"
            # ... and the slot, still on B, converges on the pointer at a later poll without another move.
            assert await _until(lambda: slot.current.version == v["A"]), "stuck on B after a stale reload"
            seen.append(slot.current.version)
        finally:
            watch.cancel()
        return seen

    assert asyncio.run(scenario()) == [v["A"], v["B"], v["A"]]
    assert slot.failure is None
