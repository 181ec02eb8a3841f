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
from typing import Annotated, Any

import orjson
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from intentops import __version__
from intentops.api.batching import Batcher
from intentops.api.health import CANARY_TEXT, Canary, Unavailable, readiness
from intentops.api.middleware import Guard, Policy, request_id
from intentops.api.model import LoadedModel, ModelSlot
from intentops.api.openapi import FEEDBACK_ERRORS, error_responses, openapi_document
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
from intentops.api.shadow import ShadowScorer
from intentops.api.writer import error_text
from intentops.inference.bundle import MODEL_CARD_FILE

# The title and summary here are placeholders: GET /openapi.json names the dataset and taxonomy served.
api = FastAPI(
    title="intentops", summary="intent classification", version=__version__, docs_url=None, openapi_url=None
)
# This replica's request log: opened on the first request that logs (the replica's context exists from then).
request_log = ReplicaRequestLog()
# What the middleware checks before a body is parsed: its size (serving.max_body_bytes) and the API key.
policy = Policy()
api.add_middleware(Guard, request_log=request_log, policy=policy)


# The request examples /docs offers (Swagger's drop-down) and the document lists.
PREDICT_EXAMPLES = {
    "one": {"summary": "one text", "value": {"text": "my card has not arrived"}},
    "several": {
        "summary": "several texts, answered in order",
        "value": {"texts": ["my card has not arrived", "what exchange rate do you use?"]},
    },
}


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    retry = getattr(err, "retry_after_s", None)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """400 (a body FastAPI could not decode), 404, 405 and the like, in the API's error shape."""
    fix = "send the body as UTF-8 JSON, as documented at /docs" if err.status_code == 400 else "see /docs"
    body = {"error": str(err.detail), "where": f"{request.method} {request.url.path}", "fix": fix}
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    """A failure of this request only (the batcher retried its texts alone); details in the replica log."""
    body = {
        "error": f"internal error ({type(err).__name__})",
        "where": f"{request.method} {request.url.path}",
        "fix": "retry; if it persists, report the X-Request-ID of this response",
    }
    return JSONResponse(body, status_code=500)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(err.errors()), status_code=422)


@serve.deployment(max_ongoing_requests=32, max_queued_requests=32, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class IntentService:
    """Loads the bundle named by its settings, serves it, and swaps in a new production version when the pointer moves."""

    def __init__(self) -> None:
        # The model thread runs Python between ONNX calls (TF-IDF, post-processing, the ledger write) while the
        # event loop answers requests; a 1 ms GIL switch interval (default 5 ms) lets the loop in sooner.
        sys.setswitchinterval(0.001)
        self.root = project_root()
        self.settings: dict[str, Any] = {}
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="io")  # loads, profiles, feedback reads
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="store")  # the buffered ledger writes
        self.slot = ModelSlot(self.root, lambda: self.settings, self._run_io)
        self.recorder = Recorder()
        self.batcher = Batcher(lambda: self.slot.current, self._model_call)
        self.canary = Canary()
        # The registry's candidate on a sample of answered texts, in its own thread (intentops.api.shadow).
        self.shadow = ShadowScorer(self.root, lambda: self.settings, self._run_io)
        self._tasks: list[asyncio.Task] = []

    async def reconfigure(self, user_config: dict | None) -> None:
        """Apply settings (Serve calls this at start and on every user_config change, without a restart)."""
        settings, params = load_settings(self.root, user_config)
        self.batcher.configure(
            settings["batching"]["max_batch_size"], settings["batching"]["batch_wait_timeout_s"]
        )
        policy.configure(settings["max_body_bytes"], settings["auth"])
        old, self.settings = self.settings, settings
        if settings["store"] != old.get("store"):
            await self._run_store(self.recorder.open_store, settings["store"], params, self.root)
        if settings["monitoring"] != old.get("monitoring"):
            await self._run_io(self.recorder.profiles.open, settings["monitoring"], self.root)
        await self.slot.apply(settings, old)
        self.shadow.configure(settings["shadow"])
        self._start_tasks()

    async def reload(self, force: bool = False) -> bool:
        """Load the configured bundle if it changed (or `force`) and swap it in; True if swapped."""
        return await self.slot.reload(force)

    def _model_call(self, model: LoadedModel, texts: list[str], record: bool) -> tuple[list[dict], dict]:
        return self.recorder.call(model, texts, self.settings["top_k"], record)

    def _start_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self.slot.watch()),
                loop.create_task(
                    self.recorder.profiles.run(lambda: self.settings["monitoring"]["flush_s"], self._run_io)
                ),
                loop.create_task(self._flush_request_log()),
                loop.create_task(self.recorder.writer.run(self._run_store)),
                loop.create_task(
                    self.canary.run(lambda: self.batcher.probe(CANARY_TEXT), lambda: self.settings)
                ),
                loop.create_task(self.shadow.run(lambda: self.recorder.writer.engine, self._run_store)),
            ]

    async def _flush_request_log(self) -> None:
        """Write buffered request log lines at least once a second (a busy replica may never be idle)."""
        while True:
            await asyncio.sleep(1.0)
            request_log.flush()

    async def _run_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    async def _run_store(self, fn: Any, *args: Any) -> Any:
        """The store's own thread: a locked or slow database holds up nothing but the buffered writes."""
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

    def check_health(self) -> None:
        """Serve's health check: fails when the replica cannot serve a prediction, so Serve restarts it."""
        status, body = readiness(self.slot, self.recorder.writer, self.canary, self.settings)
        if status != 200:
            raise RuntimeError(f"replica cannot serve predictions: {body['reasons']}")

    # --- routes ----------------------------------------------------------------------------------------------
    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=error_responses(400, 413, 422, 500, 408, 503),
    )
    async def predict(
        self, body: Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)], request: Request
    ) -> Response:
        """Intent, confidence, top-k and review flags for each text, with a prediction id for /v1/feedback.

        `needs_review` says not to route the text automatically (`reason`: out_of_distribution, low_confidence or
        ambiguous); `out_of_scope` says the text is out of distribution (none of the intents).
        """
        s = self.settings
        texts = request_texts(body, s["max_texts"], s["max_text_chars"])
        results = await self.batcher.predict(texts)
        rows = [r for r, _ in results]
        self.shadow.offer(texts, rows)  # a sample joins the challenger's queue; the rows are not changed
        call = max((c for _, c in results), key=lambda c: c["batch_size"])
        version = rows[0]["model_version"]
        info = request.scope.get("intentops")
        if info is not None:  # for the request log line (middleware.Guard)
            info.update(
                model_version=version,
                n_texts=len(rows),
                out_of_scope=sum(r["out_of_scope"] for r in rows),  # out of distribution only
                needs_review=sum(r["needs_review"] for r in rows),  # any reason
                **call,
            )
        rid = info["request_id"] if info is not None else request_id(request.scope["headers"])
        body = orjson.dumps({"request_id": rid, "model_version": version, "predictions": rows})
        return Response(body, media_type="application/json")  # encoded once, not validated again

    @api.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        status_code=201,
        responses=error_responses(400, 404, 409, 413, 422, 500, 408, 503, overrides=FEEDBACK_ERRORS),
    )
    async def feedback(self, body: FeedbackRequest, request: Request) -> JSONResponse:
        """Store a corrected label for a prediction id this API returned (idempotent per client with `feedback_id`).

        The correction is recorded under the API key's client (middleware.Guard), not the `annotator` field; for
        a prediction whose text is queued it is that client's labelling vote. An id still in the write buffer
        (the store was slow or down) is written first; while the store cannot take it the answer is 503 with
        Retry-After, and the id is kept.
        """
        from intentops.api.middleware import ANONYMOUS
        from intentops.api.schemas import feedback_text

        if body.label not in self.slot.current.labels:
            raise RequestError(
                422,
                f"label {body.label!r} is not in the model's taxonomy",
                where="request body: label",
                fix="use one of the intents listed by GET /v1/model",
            )
        s = self.settings
        text = feedback_text(body, s["feedback"]["accept_text"], s["max_text_chars"])
        client = (request.scope.get("intentops") or {}).get("client") or ANONYMOUS
        writer = self.recorder.writer
        if writer.engine is None:
            raise RequestError(
                503,
                "feedback is off: this deployment does not record predictions",
                where="serving.store.record_predictions",
                fix="turn it on in serving/config.yaml",
            )
        if writer.is_buffered(body.prediction_id) and not await writer.write_now(self._run_store):
            raise store_unavailable(writer.state.error, "the prediction is buffered, not stored yet")
        try:
            result = await self._run_store(self._add_feedback, writer.engine, body, client, text)
        except RequestError:
            raise
        except Exception as err:
            raise store_unavailable(error_text(err), "the feedback store did not answer") from err
        answer = {"prediction_id": body.prediction_id, "label": body.label, "client": client, **result}
        return JSONResponse(answer, status_code=201)

    @staticmethod
    def _add_feedback(engine: Any, body: FeedbackRequest, client: str, text: str | None) -> dict:
        """ledger.record_correction, its unknown id a 404 and a reused feedback_id a 409."""
        from intentops.feedback import ledger, store

        try:
            result = ledger.record_correction(
                engine,
                body.prediction_id,
                body.label,
                client,
                feedback_id=body.feedback_id,
                annotator=body.annotator,
                text=text,
            )
        except store.FeedbackConflict as err:
            held = err.stored
            raise RequestError(
                409,
                f"feedback_id {held['feedback_id']!r} of client {client!r} already holds label "
                f"{held['label']!r} for prediction {held['prediction_id']!r}",
                where="request body: feedback_id",
                fix="a retry must repeat the stored correction; send a new feedback_id for a new correction "
                "(a client's latest correction of a prediction is its vote)",
            ) from err
        if result is None:
            raise RequestError(
                404,
                f"unknown prediction id {body.prediction_id!r}",
                where="request body: prediction_id",
                fix="send a prediction_id returned by POST /v1/predict",
            )
        return result

    @api.get("/v1/model", responses=error_responses(500, 408, 503))
    async def model_info(self, request: Request) -> dict:
        """The model card of the version being served, its labels and review thresholds, and a link to the
        human-readable card (`model_card`, null when the bundle has none)."""
        m = self.slot.current
        link = f"{request.scope.get('root_path', '')}/v1/model/card" if m.card_markdown is not None else None
        return {
            "version": m.version,
            "bundle": str(m.bundle_dir),
            "labels": sorted(m.labels),
            "thresholds": m.thresholds,
            "variant": m.variant,
            "card": m.card,
            "model_card": link,
            "reload": self.slot.failure.report() if self.slot.failure else None,
        }

    @api.get(
        "/v1/model/card",
        response_class=Response,  # no default media type: 200 is markdown, the errors JSON
        responses={
            200: {
                "description": "the served bundle's model_card.md",
                "content": {"text/markdown": {"schema": {"type": "string"}}},
            },
            **error_responses(404, 500, 408, 503, overrides={404: "the served bundle has no model card"}),
        },
    )
    async def model_card(self) -> Response:
        """The model card of the version being served, for people: intended use, data, metrics, limitations."""
        m = self.slot.current
        if m.card_markdown is None:
            raise RequestError(
                404,
                f"the served bundle {m.version} has no model card ({MODEL_CARD_FILE})",
                where=str(m.bundle_dir),
                fix="serve a bundle exported by this version of `export` (it renders the card), or read "
                "GET /v1/model for the machine-readable card",
            )
        return PlainTextResponse(m.card_markdown, media_type="text/markdown")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @api.get(
        "/readyz",
        responses={
            503: {"description": "loading or unhealthy: the same body, status and reasons; Retry-After 5"}
        },
    )
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 ready, or degraded (predictions served, reasons listed: store down, a load failing);
        503 loading or unhealthy (no model, or the predict canary stuck or failing)."""
        status, body = readiness(self.slot, self.recorder.writer, self.canary, self.settings)
        return JSONResponse(body, status_code=status, headers={"Retry-After": "5"} if status == 503 else None)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> dict:
        """The document for the model and settings being served (openapi.openapi_document)."""
        m = self.slot.current
        return openapi_document(api.openapi(), m.labels, m.card, self.settings, bool(policy.keys))

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="intentops API")

    def __del__(self) -> None:
        """Serve's graceful shutdown (and a redeploy): write the buffered predictions, shadow scores, logs, profiles."""
        request_log.flush()
        self.recorder.writer.flush(deadline_s=self.settings.get("store", {}).get("timeout_s", 2.0) * 4)
        engine = self.recorder.writer.engine
        if engine is not None:  # shadow scores still buffered (at most flush_s worth)
            self.shadow.write_some(engine)
        self.recorder.profiles.close()


def store_unavailable(error: str | None, what: str) -> Unavailable:
    return Unavailable(
        f"{what}: {error or 'store unavailable'}",
        where="the prediction store (serving.store.db or $INTENTOPS_DB_URL)",
        fix="retry after the Retry-After seconds; /readyz says when the store is back",
        retry_after_s=5,
    )
