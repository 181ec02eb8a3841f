"""The served model: loaded and warmed up in full, then swapped in as one reference; what the API says about it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intentops.api.settings import resolve_bundle, watched_registry
from intentops.inference.predictor import Predictor

log = logging.getLogger("ray.serve")  # Serve's replica log (JSON lines with encoding: JSON)


@dataclass(frozen=True)
class LoadedModel:
    """A predictor with what the API reports about it; swapped as one reference."""

    predictor: Predictor
    bundle_dir: Path
    version: str
    card: dict
    thresholds: dict
    labels: frozenset[str] = field(repr=False)


def model_version(predictor: Predictor, bundle_dir: Path, registry_version: str | None) -> str:
    """The bundle's content version, else its card's, else the registry version, else the folder name."""
    return str(predictor.version or predictor.card.get("version") or registry_version or bundle_dir.name)


def model_card(predictor: Predictor) -> dict:
    """The bundle's card (card.json), else its record without the label list (a torch bundle has no card)."""
    return dict(predictor.card) or {k: v for k, v in predictor.meta.items() if k != "labels"}


def serving_calibration(
    calibration: Mapping[str, Any], review: Mapping[str, Any]
) -> tuple[dict, dict[str, Any]]:
    """The bundle's calibration with the config's review thresholds where the bundle has none.

    Args:
        calibration: the predictor's (ood.postprocess shape: temperature, ood, review).
        review: `serving.review` (min_confidence, min_margin).

    Returns:
        (calibration for the predictor, what GET /v1/model reports: thresholds, their source, the OOD method)
    """
    bundle_review = calibration.get("review") or {}
    merged = {
        k: float(bundle_review[k]) if isinstance(bundle_review.get(k), int | float) else float(review[k])
        for k in ("min_confidence", "min_margin")
    }
    ood = calibration.get("ood") or {}
    info = {
        **merged,
        "source": "bundle"
        if any(isinstance(bundle_review.get(k), int | float) for k in merged)
        else "config",
        "temperature": float(calibration.get("temperature", 1.0)),
        "out_of_scope": {k: ood.get(k) for k in ("method", "threshold", "higher_is_ood")}
        if ood.get("method")
        else None,
    }
    return {**calibration, "review": merged}, info


def load_model(bundle_dir: Path, registry_version: str | None, settings: Mapping[str, Any]) -> LoadedModel:
    """Load a bundle as the settings say (threads, variant, review thresholds) and warm it up."""
    import torch

    threads = settings["num_threads"]
    torch.set_num_threads(threads)
    predictor = Predictor.load(bundle_dir, threads=threads, variant=settings["variant"])
    # The bundle's calibration decides out-of-scope; the config's review thresholds fill in what it lacks.
    predictor.calibration, thresholds = serving_calibration(predictor.calibration, settings["review"])
    # Lazy parts (sessions, arenas for a full batch) are set up now, not on a request.
    for n in (1, settings["batching"]["max_batch_size"]):
        predictor.predict(["warm up"] * n, top_k=settings["top_k"])
    return LoadedModel(
        predictor=predictor,
        bundle_dir=bundle_dir,
        version=model_version(predictor, bundle_dir, registry_version),
        card=model_card(predictor),
        thresholds=thresholds,
        labels=frozenset(predictor.labels),
    )


# Settings that change what load_model builds from the same bundle folder.
_RELOAD_KEYS = ("review", "variant", "num_threads")


class ModelSlot:
    """The model being served: resolves the configured bundle, loads it off the event loop, swaps it in.

    Args:
        root: the project root the settings' paths start from.
        settings: returns the current settings (they change on reconfigure).
        run_io: runs a blocking function in the I/O threads.
    """

    def __init__(
        self, root: Path, settings: Callable[[], dict], run_io: Callable[..., Awaitable[Any]]
    ) -> None:
        from ray.serve.metrics import Counter

        self.root, self._settings, self._run_io = root, settings, run_io
        self.current: LoadedModel | None = None
        self._lock = asyncio.Lock()
        self._pointer_seen: str | None = None
        self._reloads = Counter(
            "intentops_model_reloads", description="Model loads by outcome.", tag_keys=("outcome",)
        )

    async def apply(self, settings: Mapping[str, Any], old: Mapping[str, Any]) -> None:
        """Reload when new settings name another bundle or change how it is loaded."""
        model = self.current
        target, _ = resolve_bundle(settings["bundle"], settings["registry_dir"], self.root)
        stale = (
            model is None
            or model.bundle_dir != target
            or any(settings[k] != old.get(k) for k in _RELOAD_KEYS)
        )
        if stale:
            await self.reload(force=True)

    async def reload(self, force: bool = False) -> bool:
        """Load the configured bundle if it changed (or `force`), fully, then swap the reference; True if swapped.

        A bundle that fails to load leaves the current model serving (and raises at start-up, when there is none).
        """
        async with self._lock:
            s = self._settings()
            try:
                target, registry_version = resolve_bundle(s["bundle"], s["registry_dir"], self.root)
                if not force and self.current is not None and self.current.bundle_dir == target:
                    return False
                model = await self._run_io(load_model, target, registry_version, s)
            except Exception as err:
                self._reloads.inc(tags={"outcome": "error"})
                if self.current is None:
                    raise
                log.error("model reload failed, still serving %s: %s", self.current.version, err)
                return False
            previous, self.current = self.current, model  # the swap: new requests see the new model from here
            self._reloads.inc(tags={"outcome": "ok"})
            log.info(
                "serving model %s from %s (was %s)",
                model.version,
                model.bundle_dir,
                previous.version if previous else None,
                extra={"ray_serve_extra_fields": {"model_version": model.version, "event": "model_loaded"}},
            )
            return True

    async def watch(self) -> None:
        """Poll the production pointer; when the version it names changes, load that version and swap it in."""
        while True:
            interval = self._settings()["watch_interval_s"]
            await asyncio.sleep(interval or 1.0)
            registry = watched_registry(self._settings(), self.root)
            if not interval or registry is None:
                continue
            try:
                seen = registry.production()
            except OSError:
                continue
            if seen != self._pointer_seen:
                self._pointer_seen = seen
                await self.reload()
