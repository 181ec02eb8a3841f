"""The served model: loaded and warmed up in full, then swapped in as one reference; what the API says about it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intentops.api.settings import registry_of, resolve_bundle, watched_registry
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
    # The graph served, the one the settings asked for, and why they differ (None when they don't).
    variant: dict = field(default_factory=lambda: {"requested": "fp32", "served": "fp32", "reason": None})
    # The bundle's human-readable model card (model_card.md), None when the bundle has none.
    card_markdown: str | None = field(default=None, repr=False)


def model_version(predictor: Predictor, bundle_dir: Path, registry_version: str | None) -> str:
    """The bundle's content version, else its card's, else the registry version, else the folder name."""
    return str(predictor.version or predictor.card.get("version") or registry_version or bundle_dir.name)


def model_card(predictor: Predictor) -> dict:
    """The bundle's card (card.json), else its record without the label list (a torch bundle has no card)."""
    return dict(predictor.card) or {k: v for k, v in predictor.meta.items() if k != "labels"}


def read_model_card(bundle_dir: Path) -> str | None:
    """The bundle's model_card.md (what export renders for people), or None when it has none."""
    from intentops.inference.bundle import MODEL_CARD_FILE

    path = bundle_dir / MODEL_CARD_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


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


def check_bundle(bundle_dir: Path, registry_version: str | None, allow_torch: bool) -> dict:
    """The bundle's record, once its manifest verified (before anything in it is unpickled or run).

    Serving takes ONNX bundles (`export`) only, unless `serving.allow_torch_bundles` lets a torch one in.
    """
    from intentops.errors import UserError
    from intentops.inference.bundle import BUNDLE_META, verify_bundle

    meta = verify_bundle(bundle_dir, registry_version)
    if meta.get("format") != "onnx" and not allow_torch:
        raise UserError(
            f"serving takes ONNX bundles only; {bundle_dir} is a {meta.get('format')!r} bundle",
            where=str(bundle_dir / BUNDLE_META),
            fix="serve the exported bundle (models/bundle or a registry version), or set "
            "serving.allow_torch_bundles: true for a trusted torch bundle",
        )
    return meta


def served_variant(meta: Mapping[str, Any], requested: str, force: bool) -> dict:
    """The graph to serve: `requested`, unless it is a quantized graph that `export` marked unfit or never
    checked (bundle.json "variant_checks"), then fp32; `force` (serving.force_variant) serves it anyway."""
    check = (meta.get("variant_checks") or {}).get(requested)
    reason = None
    if requested == "fp32" or force:
        pass
    elif check is None:
        reason = f"the bundle records no accuracy check of its {requested} graph (exported before the check)"
    elif not check.get("fit"):
        reason = (
            f"its {requested} graph loses {check['drop_pt']} pt of test accuracy against fp32, over "
            f"export.max_int8_drop ({check['max_drop_pt']} pt)"
        )
    served = "fp32" if reason else requested
    return {"requested": requested, "served": served, "reason": reason and f"serving fp32: {reason}"}


def load_model(bundle_dir: Path, registry_version: str | None, settings: Mapping[str, Any]) -> LoadedModel:
    """Verify a bundle, load it as the settings say (threads, variant, review thresholds) and warm it up."""
    meta = check_bundle(bundle_dir, registry_version, settings["allow_torch_bundles"])
    variant = served_variant(meta, settings["variant"], settings["force_variant"])
    if variant["reason"]:
        log.warning(
            "%s (set serving.force_variant: true to serve it anyway)",
            variant["reason"],
            extra={"ray_serve_extra_fields": {"event": "variant_fallback", **variant}},
        )
    threads = settings["num_threads"]
    predictor = Predictor.load(bundle_dir, threads=threads, variant=variant["served"])
    if predictor.meta.get("format") == "torch":
        import torch

        torch.set_num_threads(threads)
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
        variant=variant,
        card_markdown=read_model_card(bundle_dir),
    )


def candidate_of(settings: Mapping[str, Any], root: Path) -> str | None:
    """The version the settings' registry stages as the candidate (None: none, or it is in production)."""
    return registry_of(settings, root).state().candidate


def load_candidate(version: str, settings: Mapping[str, Any], root: Path) -> LoadedModel:
    """The registry's candidate, fetched (verified in the bundle cache) and loaded as the champion is."""
    bundle_dir = registry_of(settings, root).fetch(version, settings["bundle_cache"]).resolve()
    return load_model(bundle_dir, version, settings)


@dataclass
class ReloadFailure:
    """A load that failed: retried with backoff (2, 4, 8 ... 60 s) and shown by /readyz and /v1/model."""

    target: str
    error: str
    attempts: int
    retry_at: float  # time.monotonic()
    force: bool

    def report(self) -> dict:
        return {
            "target": self.target,
            "error": self.error,
            "attempts": self.attempts,
            "retry_in_s": round(max(0.0, self.retry_at - time.monotonic()), 1),
        }


# Settings that change what load_model builds from the same bundle folder.
_RELOAD_KEYS = (
    "review",
    "variant",
    "force_variant",
    "num_threads",
    "allow_torch_bundles",
    "registry",
    "bundle",
)
RETRY_MAX_S = 60.0


class ModelSlot:
    """The model being served: resolves the configured bundle, loads it off the event loop, swaps it in.

    A load that fails leaves the current model serving and is retried with backoff (`failure`).

    Args:
        root: the project root the settings' paths start from.
        settings: returns the current settings (they change on reconfigure).
        run_io: runs a blocking function in the I/O threads.
    """

    def __init__(
        self, root: Path, settings: Callable[[], dict], run_io: Callable[..., Awaitable[Any]]
    ) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.root, self._settings, self._run_io = root, settings, run_io
        self.current: LoadedModel | None = None
        self.failure: ReloadFailure | None = None
        self._lock = asyncio.Lock()
        self._pointer_seen: str | None = None  # the production pointer at the last poll
        self._loaded_from: str | None = None  # the registry version the current model was resolved as
        self._reloads = Counter(
            "intentops_model_reloads", description="Model loads by outcome.", tag_keys=("outcome",)
        )
        self._failing = Gauge(
            "intentops_model_reload_failing",
            description="1 while a model load keeps failing (retried), else 0.",
        )
        self._fallback = Gauge(
            "intentops_variant_fallback",
            description="1 while the replica serves fp32 although serving.variant asks for another graph.",
            tag_keys=("requested",),
        )

    async def apply(self, settings: Mapping[str, Any], old: Mapping[str, Any]) -> None:
        """Reload when new settings name another bundle or change how it is loaded."""
        model = self.current
        stale = (
            model is None
            or any(settings[k] != old.get(k) for k in _RELOAD_KEYS)
            or (await self._run_io(resolve_bundle, settings, self.root))[0] != model.bundle_dir
        )
        if stale:
            await self.reload(force=True)

    async def reload(self, force: bool = False) -> bool:
        """Load the configured bundle if it changed (or `force`), fully, then swap the reference; True if swapped.

        A bundle that fails to load (or to verify) leaves the current model serving and is retried with
        backoff; at start-up, when there is no model yet, it raises.
        """
        async with self._lock:
            s = self._settings()
            target = s["bundle"]
            try:
                bundle_dir, registry_version = await self._run_io(resolve_bundle, s, self.root)
                target = str(bundle_dir)
                if not force and self.current is not None and self.current.bundle_dir == bundle_dir:
                    self._loaded_from = registry_version
                    self._failed(None, target, force)
                    return False
                model = await self._run_io(load_model, bundle_dir, registry_version, s)
            except Exception as err:
                self._reloads.inc(tags={"outcome": "error"})
                if self.current is None:
                    raise
                self._failed(err, target, force)
                return False
            previous, self.current = self.current, model  # the swap: new requests see the new model from here
            self._loaded_from = registry_version
            self._fallback.set(
                1 if model.variant["reason"] else 0, tags={"requested": model.variant["requested"]}
            )
            self._failed(None, target, force)
            self._reloads.inc(tags={"outcome": "ok"})
            log.info(
                "serving model %s from %s (was %s)",
                model.version,
                model.bundle_dir,
                previous.version if previous else None,
                extra={"ray_serve_extra_fields": {"model_version": model.version, "event": "model_loaded"}},
            )
            return True

    def _failed(self, err: Exception | None, target: str, force: bool) -> None:
        """Record a failed load (next retry after 2, 4, 8 ... 60 s), or clear the record after a good one."""
        if err is None:
            self.failure = None
            self._failing.set(0)
            return
        attempts = (self.failure.attempts if self.failure else 0) + 1
        delay = min(2.0**attempts, RETRY_MAX_S)
        what = err.render() if hasattr(err, "render") else f"{type(err).__name__}: {err}"
        self.failure = ReloadFailure(target, what, attempts, time.monotonic() + delay, force)
        self._failing.set(1)
        log.error(
            "model load failed (attempt %d, retry in %.0f s), still serving %s: %s",
            attempts,
            delay,
            self.current.version if self.current else None,
            what,
        )

    async def watch(self) -> None:
        """Retry a failed load when due; poll the production pointer and load the version it names when it moves.

        A poll also reloads when the pointer names a version other than the one served although it did not move
        (a reload that resolved an older pointer, or any other missed move): the replica converges on the
        pointer instead of trusting that it saw every move.
        """
        while True:
            interval = self._settings()["watch_interval_s"]
            await asyncio.sleep(interval or 1.0)
            failure = self.failure
            if failure is not None and time.monotonic() >= failure.retry_at:
                await self.reload(force=failure.force)
                continue
            registry = watched_registry(self._settings(), self.root)
            if not interval or registry is None:
                continue
            try:
                seen = await self._run_io(registry.production)
            except Exception as err:  # an unreachable registry: keep serving, poll again
                log.warning("cannot read the production pointer at %s: %s", registry.url, err)
                continue
            moved, behind = seen != self._pointer_seen, seen != self._loaded_from and self.failure is None
            if moved:
                log.info(
                    "production pointer: %s -> %s (serving %s)",
                    self._pointer_seen,
                    seen,
                    self.current.version if self.current else None,
                    extra={"ray_serve_extra_fields": {"event": "pointer_moved", "model_version": seen}},
                )
                self._pointer_seen = seen
            if moved or (behind and seen):
                await self.reload()
