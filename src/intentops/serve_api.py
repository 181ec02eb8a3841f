"""The HTTP API's pure parts: settings, bundle resolution, request checks, review flags, response rows.

serving/app.py is the Ray Serve deployment over these; nothing here imports Ray.
"""

from __future__ import annotations

import copy
import hmac
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from intentops.errors import UserError

API_KEY_ENV = "INTENTOPS_API_KEY"
PRODUCTION = "production"
# Routes a load balancer or orchestrator probes without credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class RequestError(UserError):
    """A bad request: `status` is the HTTP code, the body is {"error", "where", "fix"}."""

    def __init__(self, status: int, what: str, where: str | None = None, fix: str | None = None):
        self.status = status
        super().__init__(what, where, fix)

    def body(self) -> dict[str, Any]:
        return {"error": self.what, "where": self.where, "fix": self.fix}


# --- request and response schemas (they are also the OpenAPI document at /docs) -------------------------
class PredictRequest(BaseModel):
    """One text or a list of texts; exactly one of the two."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "my card has not arrived"}]}
    )
    text: str | None = None
    texts: list[str] | None = None


class TopK(BaseModel):
    intent: str
    confidence: float


class Prediction(BaseModel):
    prediction_id: str = Field(description="send it back with POST /v1/feedback")
    intent: str = Field(description="the top-1 intent (a suggestion only when out_of_scope)")
    confidence: float = Field(description="calibrated top-1 probability")
    top_k: list[TopK]
    out_of_scope: bool = Field(description="not routed automatically: `reason` says why")
    reason: Literal["out_of_distribution", "low_confidence", "ambiguous"] | None = Field(
        description="out_of_distribution: the out-of-scope score is past the bundle's threshold; low_confidence: "
        "top-1 below min_confidence; ambiguous: top1 - top2 below min_margin; null when in scope"
    )
    needs_review: bool = Field(description="queued for human review (true whenever out_of_scope)")
    model_version: str


class PredictResponse(BaseModel):
    request_id: str
    model_version: str
    predictions: list[Prediction]


class FeedbackRequest(BaseModel):
    """A correction for a prediction the API returned; `feedback_id` makes a retry store nothing twice."""

    model_config = ConfigDict(extra="forbid")
    prediction_id: str = Field(min_length=1, max_length=128)
    label: str = Field(min_length=1, max_length=128)
    annotator: str = Field(default="api", min_length=1, max_length=128)
    feedback_id: str | None = Field(default=None, min_length=1, max_length=128)


class FeedbackResponse(BaseModel):
    prediction_id: str
    label: str
    stored: bool = Field(description="false when the same feedback was already stored (an idempotent retry)")


# --- settings ----------------------------------------------------------------------------------------------
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
    }
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(
                f"serving.{key} must be a whole number >= 1, got {value!r}",
                where="serving/config.yaml user_config or conf/serving/default.yaml",
                fix="fix the value",
            )
    if s["variant"] not in ("fp32", "int8"):
        raise UserError(
            f"serving.variant must be fp32 or int8, got {s['variant']!r}",
            where="serving/config.yaml user_config or conf/serving/default.yaml",
            fix="fp32 (the exported graph) or int8 (its dynamic int8 copy, export.quantize=true)",
        )
    for key in (
        "batching.batch_wait_timeout_s",
        "watch_interval_s",
        "review.min_confidence",
        "review.min_margin",
    ):
        group, _, name = key.rpartition(".")
        value = s[group][name] if group else s[name]
        if not isinstance(value, int | float) or value < 0:
            raise UserError(
                f"serving.{key} must be a number >= 0, got {value!r}",
                where="serving/config.yaml user_config or conf/serving/default.yaml",
                fix="fix the value",
            )


def resolve_bundle(bundle: str, registry_dir: str | os.PathLike, root: Path) -> tuple[Path, str | None]:
    """(bundle folder, registry version or None). `production` follows the registry's pointer file."""
    if bundle != PRODUCTION:
        return (root / bundle).resolve(), None
    registry = root / registry_dir
    pointer = registry / PRODUCTION
    version = pointer.read_text().strip() if pointer.is_file() else ""
    if not version:
        raise UserError(
            "no production model: the registry pointer is missing or empty",
            where=str(pointer),
            fix="run the pipeline so that `promote` sets one, or set user_config.bundle to a bundle folder",
        )
    return (registry / version).resolve(), version


def pointer_path(settings: Mapping[str, Any], root: Path) -> Path | None:
    """The file the watcher polls; None when the bundle is a fixed folder."""
    return root / settings["registry_dir"] / PRODUCTION if settings["bundle"] == PRODUCTION else None


# --- the loaded model and what the API says about it -------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """A predictor with what the API reports about it; swapped as one reference."""

    predictor: Any
    bundle_dir: Path
    version: str
    card: dict
    thresholds: dict
    labels: frozenset[str] = field(repr=False)


def read_json_file(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def model_version(predictor: Any, bundle_dir: Path, registry_version: str | None) -> str:
    """The predictor's version, else the card's or bundle record's, else the registry or folder name."""
    card = model_card(predictor, bundle_dir)
    meta = getattr(predictor, "meta", None) or {}
    for cand in (
        getattr(predictor, "version", None),
        card.get("version"),
        meta.get("version"),
        registry_version,
    ):
        if cand:
            return str(cand)
    return bundle_dir.name


def model_card(predictor: Any, bundle_dir: Path) -> dict:
    """The predictor's card, else card.json in the bundle, else the bundle record without the label list."""
    card = getattr(predictor, "card", None)
    if card:
        return dict(card)
    card = read_json_file(bundle_dir / "card.json")
    if card:
        return card
    return {k: v for k, v in (getattr(predictor, "meta", None) or {}).items() if k != "labels"}


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


# --- requests and responses ---------------------------------------------------------------------------------
def request_texts(req: PredictRequest, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a predict request, or a RequestError (422 shape, 413 size)."""
    if (req.text is None) == (req.texts is None):
        raise RequestError(
            422,
            "give exactly one of `text` (a string) or `texts` (a list of strings)",
            where="request body",
            fix='send {"text": "..."} or {"texts": ["...", "..."]}',
        )
    texts = [req.text] if req.text is not None else list(req.texts or [])
    if not texts:
        raise RequestError(422, "`texts` is empty", where="request body: texts", fix="send at least one text")
    if len(texts) > max_texts:
        raise RequestError(
            413,
            f"{len(texts)} texts in one request; the limit is {max_texts}",
            where="request body: texts",
            fix=f"split the list into requests of at most {max_texts}",
        )
    for i, text in enumerate(texts):
        where = "request body: text" if req.text is not None else f"request body: texts[{i}]"
        if not text.strip():
            raise RequestError(422, "empty text", where=where, fix="send the customer's message")
        if len(text) > max_chars:
            raise RequestError(
                413,
                f"text of {len(text)} characters; the limit is {max_chars}",
                where=where,
                fix=f"send at most {max_chars} characters (the first part of the message)",
            )
    return texts


def shape_predictions(raw: Sequence[Mapping[str, Any]], version: str) -> list[dict[str, Any]]:
    """Predictor.predict rows -> API rows: a new prediction id and the model version added (key order as documented)."""
    return [
        {
            "prediction_id": str(uuid.uuid4()),
            "intent": r["intent"],
            "confidence": r["confidence"],
            "top_k": r["top_k"],
            "out_of_scope": r["out_of_scope"],
            "reason": r["reason"],
            "needs_review": r["needs_review"],
            "model_version": version,
        }
        for r in raw
    ]


def store_top_k(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Top-k in the review queue's shape: [{"intent", "score"}]."""
    return [{"intent": t["intent"], "score": t["confidence"]} for t in row["top_k"]]


def api_key_ok(headers: Sequence[tuple[bytes, bytes]], keys: str) -> bool:
    """True when the ASGI headers carry one of `keys` as X-API-Key or `Authorization: Bearer <key>`.

    `keys` is comma-separated, so a rotation can accept the old and the new key for a while.
    """
    wanted = [k.strip().encode() for k in keys.split(",") if k.strip()]
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            value = value[7:].strip()
        elif name != b"x-api-key":
            continue
        # compare_digest against every key, so timing says nothing about which one matched
        if sum(hmac.compare_digest(value, w) for w in wanted):
            return True
    return False


def import_app(root: Path) -> Any:
    """Import <root>/serving/app.py as `serving.app`, as `serve run` does from the project root (its --app-dir).

    Ray pickles the deployment by reference; replicas import `serving.app` from the driver's working
    directory, which Ray puts on their path, so run from the project root.
    """
    import importlib
    import importlib.util
    import sys

    if "serving" not in sys.modules:
        pkg = root / "serving"
        spec = importlib.util.spec_from_file_location(
            "serving", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["serving"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("serving.app")
