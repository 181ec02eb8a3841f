"""The API's settings (`serving` in params.yaml overridden by a deployment's user_config) and the bundle they name."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from intentops.errors import UserError
from intentops.inference.registry import CACHE_ENV, POINTER, Registry, is_remote, registry_url

# The project root the settings' relative paths start from (default: the working directory).
ROOT_ENV = "INTENTOPS_ROOT"
# `bundle: production` follows the registry's pointer.
PRODUCTION = POINTER
_WHERE = "serving/config.yaml user_config or conf/serving/default.yaml"
PROFILES_ENV = "INTENTOPS_PROFILES_URL"
VOCAB_ENV = "INTENTOPS_VOCAB_URL"
AUTH_MODES = ("optional", "required", "off")


def project_root() -> Path:
    """$INTENTOPS_ROOT, else the working directory."""
    return Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve()


def load_settings(root: Path, user_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], Any]:
    """(checked settings, params): the `serving` params of $INTENTOPS_PARAMS or <root>/params.yaml with user_config."""
    from omegaconf import OmegaConf

    from intentops.config import PARAMS_ENV, load_params

    params = load_params(os.environ.get(PARAMS_ENV) or root / "params.yaml")
    settings = with_environment(
        merge_settings(OmegaConf.to_container(params.serving, resolve=True), user_config)
    )
    check_settings(settings)
    check_shadow(settings)
    check_deployment(settings)
    return settings, params


def with_environment(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings with what the deployment's environment overrides: registry and profiles URLs (Secrets), the
    bundle cache folder."""
    settings["registry"] = registry_url(settings["registry"])
    settings["bundle_cache"] = os.environ.get(CACHE_ENV) or settings["bundle_cache"]
    for key, env in (("profiles", PROFILES_ENV), ("vocab", VOCAB_ENV)):
        if os.environ.get(env):
            settings["monitoring"] = {**settings["monitoring"], key: os.environ[env]}
    return settings


def check_deployment(s: Mapping[str, Any]) -> None:
    """Refuse auth and cluster settings a replica cannot honour, before it serves anything.

    `auth: required` needs $INTENTOPS_API_KEY. `cluster: true` needs shared state: a database other than a
    per-node SQLite file, profiles and registry at object-store URLs.
    """
    from intentops.config import API_KEY_ENV
    from intentops.feedback.store import DB_URL_ENV

    if s["auth"] not in AUTH_MODES:
        raise UserError(
            f"serving.auth must be one of {AUTH_MODES}, got {s['auth']!r}", where=_WHERE, fix="fix it"
        )
    if s["auth"] == "required" and not os.environ.get(API_KEY_ENV):
        raise UserError(
            f"serving.auth is `required` but ${API_KEY_ENV} is not set",
            where=f"the replica's environment (${API_KEY_ENV})",
            fix=f"set ${API_KEY_ENV} from a Secret (comma-separated keys), or set serving.auth: off to serve "
            "without authentication",
        )
    if not s["cluster"]:
        return
    shared = {
        f"${DB_URL_ENV} (the review queue)": not s["store"]["record_predictions"]
        or not (os.environ.get(DB_URL_ENV) or "sqlite").startswith("sqlite"),
        f"${PROFILES_ENV} or monitoring.profiles (serving profiles)": not s["monitoring"]["enabled"]
        or is_remote(s["monitoring"]["profiles"]),
        "$INTENTOPS_REGISTRY_URL or serving.registry (the model registry)": s["bundle"] != PRODUCTION
        or is_remote(s["registry"]),
    }
    for what, ok in shared.items():
        if not ok:
            raise UserError(
                f"cluster mode needs shared state, but {what} is local to this node",
                where=f"{_WHERE} (cluster: true)",
                fix="point it at shared storage: PostgreSQL (postgresql+psycopg://...) for the database, an "
                "object-store URL (s3://bucket/prefix) for profiles and the registry; or set cluster: false "
                "on a single machine",
            )


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
    for key in ("allow_torch_bundles", "cluster", "force_variant"):
        if not isinstance(s[key], bool):
            raise UserError(
                f"serving.{key} must be true or false, got {s[key]!r}", where=_WHERE, fix="fix it"
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
    check_feedback_settings(s)


def check_feedback_settings(s: Mapping[str, Any]) -> None:
    """Refuse a bad audit share (a share of predictions, 0-1) or a non-boolean feedback.accept_text."""
    share = s["store"]["audit_share"]
    if not isinstance(share, int | float) or isinstance(share, bool) or not 0 <= share <= 1:
        raise UserError(
            f"serving.store.audit_share must be a number from 0 to 1, got {share!r}",
            where=_WHERE,
            fix="e.g. 0.01 keeps 1 % of texts for audit labelling; 0 turns it off",
        )
    if not isinstance(s["feedback"]["accept_text"], bool):
        raise UserError(
            f"serving.feedback.accept_text must be true or false, got {s['feedback']['accept_text']!r}",
            where=_WHERE,
            fix="fix it",
        )


def check_shadow(s: Mapping[str, Any]) -> None:
    """Refuse `serving.shadow` settings that cannot work (the shadow challenger, intentops.api.shadow)."""
    sh = s["shadow"]
    if not isinstance(sh["enabled"], bool):
        raise UserError(
            f"serving.shadow.enabled must be true or false, got {sh['enabled']!r}", where=_WHERE, fix="fix it"
        )
    rate = sh["sample"]
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 < rate <= 1:
        raise UserError(
            f"serving.shadow.sample must be a share of texts in (0, 1], got {rate!r}",
            where=_WHERE,
            fix="e.g. 0.05 (5 % of texts); turn the shadow off with shadow.enabled: false",
        )
    for key in ("queue_max", "batch_size"):
        if not isinstance(sh[key], int) or isinstance(sh[key], bool) or sh[key] < 1:
            raise UserError(
                f"serving.shadow.{key} must be a whole number >= 1, got {sh[key]!r}",
                where=_WHERE,
                fix="fix the value",
            )
    check_numbers(s, ("shadow.flush_s",), 0.01)
    if sh["enabled"] and not s["store"]["record_predictions"]:
        raise UserError(
            "serving.shadow.enabled needs serving.store.record_predictions: the shadow's scores go to the store",
            where=_WHERE,
            fix="set store.record_predictions: true, or shadow.enabled: false",
        )


def check_numbers(s: Mapping[str, Any], keys: tuple[str, ...], low: float) -> None:
    """Refuse any of `keys` (group.name) that is not a number >= `low`."""
    for key in keys:
        group, _, name = key.rpartition(".")
        value = s[group][name] if group else s[name]
        if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
            raise UserError(
                f"serving.{key} must be a number >= {low:g}, got {value!r}", where=_WHERE, fix="fix the value"
            )


def registry_of(settings: Mapping[str, Any], root: Path) -> Registry:
    """The settings' registry; a relative folder starts at the project root."""
    url = settings["registry"]
    return Registry.at(url if is_remote(url) or os.path.isabs(url) else root / url)


def resolve_bundle(settings: Mapping[str, Any], root: Path) -> tuple[Path, str | None]:
    """(local bundle folder, registry version or None). `production` follows the registry's pointer and, for a
    remote registry, downloads the version into `bundle_cache` (verified there)."""
    bundle = settings["bundle"]
    if bundle != PRODUCTION:
        return (root / bundle).resolve(), None
    registry = registry_of(settings, root)
    version = registry.production()
    if not version:
        raise UserError(
            "no production model: the registry pointer is missing or empty",
            where=f"{registry.url}/{POINTER}",
            fix="run the pipeline so that `promote` sets one (or `intentops registry promote`), or set "
            "user_config.bundle to a bundle folder",
        )
    return registry.fetch(version, settings["bundle_cache"]).resolve(), version


def watched_registry(settings: Mapping[str, Any], root: Path) -> Registry | None:
    """The registry whose pointer the watcher polls; None when the bundle is a fixed folder."""
    return registry_of(settings, root) if settings["bundle"] == PRODUCTION else None
