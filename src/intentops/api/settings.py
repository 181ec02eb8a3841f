"""The API's settings (`serving` in params.yaml overridden by a deployment's user_config) and the bundle they name."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from intentops.errors import UserError
from intentops.inference.registry import POINTER, Registry

# The project root the settings' relative paths start from (default: the working directory).
ROOT_ENV = "INTENTOPS_ROOT"
# `bundle: production` follows the registry's pointer.
PRODUCTION = POINTER
_WHERE = "serving/config.yaml user_config or conf/serving/default.yaml"


def project_root() -> Path:
    """$INTENTOPS_ROOT, else the working directory."""
    return Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve()


def load_settings(root: Path, user_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], Any]:
    """(checked settings, params): the `serving` params of $INTENTOPS_PARAMS or <root>/params.yaml with user_config."""
    from omegaconf import OmegaConf

    from intentops.config import PARAMS_ENV, load_params

    params = load_params(os.environ.get(PARAMS_ENV) or root / "params.yaml")
    settings = merge_settings(OmegaConf.to_container(params.serving, resolve=True), user_config)
    check_settings(settings)
    return settings, params


def merge_settings(defaults: Mapping[str, Any], user_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `serving` params overridden by a deployment's user_config (nested keys merge, unknown keys fail)."""
    out = copy.deepcopy(dict(defaults))
    for key, value in (user_config or {}).items():
        if key not in out:
            raise UserError(
                f"unknown serving setting {key!r}",
                where="serving/config.yaml user_config",
                fix=f"use one of {sorted(out)} (conf/serving/default.yaml documents them)",
            )
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


def check_settings(s: Mapping[str, Any]) -> None:
    """Refuse settings that cannot work, naming the key."""
    positive = {
        "top_k": s["top_k"],
        "max_texts": s["max_texts"],
        "max_text_chars": s["max_text_chars"],
        "batching.max_batch_size": s["batching"]["max_batch_size"],
        "num_threads": s["num_threads"],
        "max_body_bytes": s["max_body_bytes"],
        "store.buffer_max_rows": s["store"]["buffer_max_rows"],
    }
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(
                f"serving.{key} must be a whole number >= 1, got {value!r}", where=_WHERE, fix="fix the value"
            )
    if s["variant"] not in ("fp32", "int8"):
        raise UserError(
            f"serving.variant must be fp32 or int8, got {s['variant']!r}",
            where=_WHERE,
            fix="fp32 (the exported graph) or int8 (its dynamic int8 copy, export.quantize=true)",
        )
    if not isinstance(s["allow_torch_bundles"], bool):
        raise UserError(
            f"serving.allow_torch_bundles must be true or false, got {s['allow_torch_bundles']!r}",
            where=_WHERE,
            fix="false (ONNX bundles only) or true",
        )
    check_numbers(
        s,
        ("batching.batch_wait_timeout_s", "watch_interval_s", "review.min_confidence", "review.min_margin"),
        0,
    )
    timeouts = (
        "store.timeout_s",
        "store.flush_s",
        "store.retry_max_s",
        "health.canary_interval_s",
        "health.canary_timeout_s",
    )
    check_numbers(s, timeouts, 0.001)


def check_numbers(s: Mapping[str, Any], keys: tuple[str, ...], low: float) -> None:
    """Refuse any of `keys` (group.name) that is not a number >= `low`."""
    for key in keys:
        group, _, name = key.rpartition(".")
        value = s[group][name] if group else s[name]
        if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
            raise UserError(
                f"serving.{key} must be a number >= {low:g}, got {value!r}", where=_WHERE, fix="fix the value"
            )


def resolve_bundle(bundle: str, registry_dir: str | os.PathLike, root: Path) -> tuple[Path, str | None]:
    """(bundle folder, registry version or None). `production` follows the registry's pointer."""
    if bundle != PRODUCTION:
        return (root / bundle).resolve(), None
    registry = Registry.at(root / registry_dir)
    version = registry.production()
    if not version:
        raise UserError(
            "no production model: the registry pointer is missing or empty",
            where=str(registry.root / POINTER),
            fix="run the pipeline so that `promote` sets one, or set user_config.bundle to a bundle folder",
        )
    return (registry.root / version).resolve(), version


def watched_registry(settings: Mapping[str, Any], root: Path) -> Registry | None:
    """The registry whose pointer the watcher polls; None when the bundle is a fixed folder."""
    return Registry.at(root / settings["registry_dir"]) if settings["bundle"] == PRODUCTION else None
