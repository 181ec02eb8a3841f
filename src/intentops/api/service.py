"""The intent API: a Ray Serve deployment (FastAPI ingress) over `intentops.inference.predictor.Predictor`.

Settings are `serving` in params.yaml (conf/serving/default.yaml) overridden by the deployment's `user_config`;
serving/app.py binds `IntentService` for `serve run serving/config.yaml`. The routes stay thin: the model slot
loads and swaps the model, the batcher pools texts into model calls, the recorder records each call.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (request bodies) at
# import time, and Serve's ingress copies the methods, so they must be real types, not strings.
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from ray import serve

from intentops.api.batching import Batcher
from intentops.api.middleware import Guard, request_id
from intentops.api.model import LoadedModel, ModelSlot
from intentops.api.recorder import Recorder
from intentops.api.requestlog import ReplicaRequestLog
from intentops.api.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    PredictRequest,
    PredictResponse,
    RequestError,
    request_texts,
    validation_error_body,
)
from intentops.api.settings import load_settings, project_root

api = FastAPI(title="intentops", summary="Banking77 intent classification", docs_url=None, openapi_url=None)
# This replica's request log: opened on the first request that logs (the replica's context exists from then).
request_log = ReplicaRequestLog()
api.add_middleware(Guard, request_log=request_log)


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(err.errors()), status_code=422)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class IntentService:
    """Loads the bundle named by its settings, serves it, and swaps in a new production version when the pointer moves."""

    def __init__(self) -> None:
        # The model thread runs Python between ONNX calls (TF-IDF, post-processing, the ledger write) while the
        # event loop answers requests; a 1 ms GIL switch interval (default 5 ms) lets the loop in sooner.
        sys.setswitchinterval(0.001)
        self.root = project_root()
        self.settings: dict[str, Any] = {}
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="io")  # db writes, loads, profiles
        self.slot = ModelSlot(self.root, lambda: self.settings, self._run_io)
        self.recorder = Recorder()
        self.batcher = Batcher(lambda: self.slot.current, self._model_call)
        self._tasks: list[asyncio.Task] = []

    async def reconfigure(self, user_config: dict | None) -> None:
        """Apply settings (Serve calls this at start and on every user_config change, without a restart)."""
        settings, params = load_settings(self.root, user_config)
        self.batcher.configure(
            settings["batching"]["max_batch_size"], settings["batching"]["batch_wait_timeout_s"]
        )
        old, self.settings = self.settings, settings
        if settings["store"] != old.get("store"):
            self.recorder.engine = await self._run_io(
                self.recorder.open_store, settings["store"], params, self.root
            )
        if settings["monitoring"] != old.get("monitoring"):
            await self._run_io(self.recorder.profiles.open, settings["monitoring"], self.root)
        await self.slot.apply(settings, old)
        self._start_tasks()

    async def reload(self, force: bool = False) -> bool:
        """Load the configured bundle if it changed (or `force`) and swap it in; True if swapped."""
        return await self.slot.reload(force)

    def _model_call(self, model: LoadedModel, texts: list[str]) -> tuple[list[dict], dict]:
        return self.recorder.call(model, texts, self.settings["top_k"])

    def _start_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self.slot.watch()),
                loop.create_task(
                    self.recorder.profiles.run(lambda: self.settings["monitoring"]["flush_s"], self._run_io)
                ),
                loop.create_task(self._flush_request_log()),
            ]

    async def _flush_request_log(self) -> None:
        """Write buffered request log lines at least once a second (a busy replica may never be idle)."""
        while True:
            await asyncio.sleep(1.0)
            request_log.flush()

    async def _run_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    # --- routes ----------------------------------------------------------------------------------------------
    @api.post("/v1/predict", response_model=PredictResponse, responses={413: {}, 422: {}})
    async def predict(self, body: PredictRequest, request: Request) -> Response:
        """Intent, confidence, top-k and out-of-scope flags for each text, with a prediction id for /v1/feedback."""
        s = self.settings
        texts = request_texts(body, s["max_texts"], s["max_text_chars"])
        results = await self.batcher.predict(texts)
        rows = [r for r, _ in results]
        call = max((c for _, c in results), key=lambda c: c["batch_size"])
        version = rows[0]["model_version"]
        info = request.scope.get("intentops")
        if info is not None:  # for the request log line (middleware.Guard)
            flagged = sum(r["out_of_scope"] for r in rows)
            info.update(model_version=version, n_texts=len(rows), out_of_scope=flagged, **call)
        rid = info["request_id"] if info is not None else request_id(request.scope["headers"])
        body = orjson.dumps({"request_id": rid, "model_version": version, "predictions": rows})
        return Response(body, media_type="application/json")  # encoded once, not validated again

    @api.post("/v1/feedback", response_model=FeedbackResponse, status_code=201, responses={404: {}, 422: {}})
    async def feedback(self, body: FeedbackRequest) -> JSONResponse:
        """Store a corrected label for a prediction id this API returned (idempotent with `feedback_id`)."""
        from intentops.feedback import ledger, store

        recorder = self.recorder
        if body.label not in self.slot.current.labels:
            raise RequestError(
                422,
                f"label {body.label!r} is not in the model's taxonomy",
                where="request body: label",
                fix="use one of the intents listed by GET /v1/model",
            )
        if recorder.engine is None:
            raise RequestError(
                503,
                "feedback is off: this deployment does not record predictions",
                where="serving.store.record_predictions",
                fix="turn it on in serving/config.yaml",
            )
        if not await self._run_io(ledger.known, recorder.engine, body.prediction_id):
            raise RequestError(
                404,
                f"unknown prediction id {body.prediction_id!r}",
                where="request body: prediction_id",
                fix="send a prediction_id returned by POST /v1/predict",
            )
        stored = await self._run_io(
            lambda: store.add_feedback(
                recorder.engine, body.prediction_id, body.label, body.annotator, body.feedback_id
            )
        )
        return JSONResponse(
            {"prediction_id": body.prediction_id, "label": body.label, "stored": stored}, status_code=201
        )

    @api.get("/v1/model")
    async def model_info(self) -> dict:
        """The model card of the version being served, its labels and review thresholds."""
        m = self.slot.current
        return {
            "version": m.version,
            "bundle": str(m.bundle_dir),
            "labels": sorted(m.labels),
            "thresholds": m.thresholds,
            "card": m.card,
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: a model is loaded."""
        model = self.slot.current
        if model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model_version": model.version})

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> dict:
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="intentops API")

    def __del__(self) -> None:
        request_log.flush()
        self.recorder.profiles.close()
