"""The intent API: a Ray Serve deployment (FastAPI ingress) over `intentops.predictor.Predictor`.

`serve run serving/config.yaml` from the project root. Settings are `serving` in params.yaml
(conf/serving/default.yaml) overridden by the deployment's `user_config`; the pure parts live in
intentops.serve_api and intentops.serve_ledger.
"""

import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from ray import serve

from intentops.errors import UserError
from intentops.serve_api import (
    API_KEY_ENV,
    OPEN_PATHS,
    FeedbackRequest,
    FeedbackResponse,
    LoadedModel,
    PredictRequest,
    PredictResponse,
    RequestError,
    api_key_ok,
    check_settings,
    merge_settings,
    model_card,
    model_version,
    pointer_path,
    request_texts,
    resolve_bundle,
    serving_calibration,
    shape_predictions,
    store_top_k,
)

ROOT_ENV = "INTENTOPS_ROOT"
log = logging.getLogger("ray.serve")  # Serve's handlers: JSON lines with the request id under encoding: JSON

api = FastAPI(title="intentops", summary="Banking77 intent classification", docs_url=None, openapi_url=None)


# --- auth, access log, latency and error metrics: one pure ASGI middleware (no per-request task overhead) ---
class Guard:
    """401 without the API key (when $INTENTOPS_API_KEY is set; OPEN_PATHS excepted), then one JSON log line."""

    def __init__(self, asgi_app: Any):
        from ray.serve.metrics import Counter as MetricCounter
        from ray.serve.metrics import Histogram

        self.app = asgi_app
        self.key = os.environ.get(API_KEY_ENV) or None
        self.latency = Histogram(
            "intentops_request_latency_ms",
            description="Request latency in the replica (ms).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("route",),
        )
        self.errors = MetricCounter(
            "intentops_request_errors",
            description="Responses with status >= 400.",
            tag_keys=("route", "status"),
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        info: dict[str, Any] = {"status": 500}
        scope["intentops"] = info

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        try:
            if self.key and path not in OPEN_PATHS and not api_key_ok(scope["headers"], self.key):
                await JSONResponse(
                    {
                        "error": "missing or wrong API key",
                        "where": "X-API-Key or Authorization header",
                        "fix": "send the key as `X-API-Key: <key>` or `Authorization: Bearer <key>`",
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self._observe(scope, path, info, (time.perf_counter() - start) * 1000)

    def _observe(self, scope: dict, path: str, info: dict, ms: float) -> None:
        route = path if path.startswith("/v1/") or path in OPEN_PATHS else "other"
        status = info["status"]
        self.latency.observe(ms, tags={"route": route})
        if status >= 400:
            self.errors.inc(tags={"route": route, "status": str(status)})
        if path in OPEN_PATHS:
            return  # probes every few seconds would drown the log
        info["method"], info["path"], info["latency_ms"] = scope["method"], route, round(ms, 2)
        # The JSON file only: Serve would also format the line for stderr, which Ray's log monitor then tails.
        log.info(
            "%s %s %s %.1fms",
            scope["method"],
            route,
            status,
            ms,
            extra={"ray_serve_extra_fields": info, "log_to_stderr": False},
        )


api.add_middleware(Guard)


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request body"
    return JSONResponse(
        {
            "error": f"invalid request: {first.get('msg', 'bad body')}",
            "where": where,
            "fix": "send a JSON body as documented at /docs",
        },
        status_code=422,
    )


def _request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class IntentService:
    """Loads the bundle named by its settings, serves it, and swaps in a new production version when the pointer moves."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter as MetricCounter
        from ray.serve.metrics import Histogram

        # The model thread runs Python between ONNX calls (TF-IDF, post-processing, the ledger write) while the
        # event loop answers requests; a 1 ms GIL switch interval (default 5 ms) lets the loop in sooner.
        sys.setswitchinterval(0.001)
        self.root = Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve()
        self.model: LoadedModel | None = None
        self.settings: dict[str, Any] = {}
        self.engine = None
        self.profiles = self.vocab = None
        self._pending_features: deque[tuple[list[str], list[dict]]] = deque()  # appended by the model thread
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")  # one model call at a time
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="io")  # db writes, loads, profiles
        self._reload_lock = asyncio.Lock()
        self._model_lock = asyncio.Lock()
        self._in_flight = 0  # /v1/predict requests being handled
        self._pending: list[tuple[list[str], asyncio.Future]] = []
        self._tasks: list[asyncio.Task] = []
        self._pointer_seen: str | None = None
        self.m_predictions = MetricCounter(
            "intentops_predictions",
            description="Predictions by intent.",
            tag_keys=("intent", "model_version"),
        )
        self.m_review = MetricCounter(
            "intentops_needs_review",
            description="Predictions flagged needs_review.",
            tag_keys=("reason", "model_version"),
        )
        self.m_confidence = Histogram(
            "intentops_confidence",
            description="Top-1 confidence.",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
            tag_keys=("model_version",),
        )
        self.m_batch = Histogram(
            "intentops_batch_size",
            description="Texts per model call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )
        self.m_reloads = MetricCounter(
            "intentops_model_reloads", description="Model loads by outcome.", tag_keys=("outcome",)
        )

    # --- configuration and model loading ----------------------------------------------------------------
    async def reconfigure(self, user_config: dict | None) -> None:
        """Apply settings (Serve calls this at start and on every user_config change, without a restart)."""
        from omegaconf import OmegaConf

        from intentops.config import load_params

        params = load_params(os.environ.get("INTENTOPS_PARAMS") or self.root / "params.yaml")
        settings = merge_settings(OmegaConf.to_container(params.serving, resolve=True), user_config)
        check_settings(settings)
        self._predict_batch.set_max_batch_size(settings["batching"]["max_batch_size"])
        self._predict_batch.set_batch_wait_timeout_s(settings["batching"]["batch_wait_timeout_s"])
        old = self.settings
        self.settings = settings
        if settings["store"] != old.get("store"):
            self.engine = await self._run_io(self._open_store, params)
        if settings["monitoring"] != old.get("monitoring"):
            await self._run_io(self._open_profiles)
        model = self.model
        target, _ = resolve_bundle(settings["bundle"], settings["registry_dir"], self.root)
        stale = (
            model is None
            or model.bundle_dir != target
            or any(settings[k] != old.get(k) for k in ("review", "variant", "num_threads"))
        )
        if stale:
            await self.reload(force=True)
        self._start_tasks()

    def _open_store(self, params: Any) -> Any:
        from intentops.feedback import store

        if self.engine is not None:
            self.engine.dispose()
        s = self.settings["store"]
        if not s["record_predictions"]:
            return None
        cfg = params.feedback.store
        engine = store.make_engine(
            store.db_url(self.root / s["db"]),
            busy_timeout_ms=cfg.busy_timeout_ms,
            pool_size=cfg.pool_size,
            max_overflow=cfg.max_overflow,
        )
        store.check_schema(engine)  # fail at start, with the fix, unless `intentops db upgrade` ran
        return engine

    def _open_profiles(self) -> None:
        from intentops.monitor.profiles import ProfileWindowWriter, read_vocab

        self._flush_profiles()
        m = self.settings["monitoring"]
        self.profiles = self.vocab = None
        if not m["enabled"]:
            return
        try:
            self.vocab = read_vocab(str(self.root / m["vocab"]))
        except UserError as err:
            log.warning("monitoring profiles off: %s", err.render())
            return
        profiles = m["profiles"] if "://" in m["profiles"] else str(self.root / m["profiles"])
        self.profiles = ProfileWindowWriter(
            profiles, max_rows=m["window_max_rows"], max_seconds=m["window_max_seconds"]
        )

    async def reload(self, force: bool = False) -> bool:
        """Load the configured bundle if it changed (or `force`), fully, then swap the reference; True if swapped.

        A bundle that fails to load leaves the current model serving (and raises at start-up, when there is none).
        """
        async with self._reload_lock:
            s = self.settings
            try:
                target, registry_version = resolve_bundle(s["bundle"], s["registry_dir"], self.root)
                if not force and self.model is not None and self.model.bundle_dir == target:
                    return False
                model = await self._run_io(self._load, target, registry_version)
            except Exception as err:
                self.m_reloads.inc(tags={"outcome": "error"})
                if self.model is None:
                    raise
                log.error("model reload failed, still serving %s: %s", self.model.version, err)
                return False
            previous, self.model = self.model, model  # the swap: new requests see the new model from here
            self.m_reloads.inc(tags={"outcome": "ok"})
            log.info(
                "serving model %s from %s (was %s)",
                model.version,
                model.bundle_dir,
                previous.version if previous else None,
                extra={"ray_serve_extra_fields": {"model_version": model.version, "event": "model_loaded"}},
            )
            return True

    def _load(self, bundle_dir: Path, registry_version: str | None) -> LoadedModel:
        import torch

        from intentops.predictor import Predictor

        threads = self.settings["num_threads"]
        torch.set_num_threads(threads)
        predictor = Predictor.load(bundle_dir, threads=threads, variant=self.settings["variant"])
        # The bundle's calibration decides out-of-scope; the config's review thresholds fill in what it lacks.
        predictor.calibration, thresholds = serving_calibration(
            predictor.calibration, self.settings["review"]
        )
        # Lazy parts (sessions, arenas for a full batch) are set up now, not on a request.
        for n in (1, self.settings["batching"]["max_batch_size"]):
            predictor.predict(["warm up"] * n, top_k=self.settings["top_k"])
        card = model_card(predictor, bundle_dir)
        return LoadedModel(
            predictor=predictor,
            bundle_dir=bundle_dir,
            version=model_version(predictor, bundle_dir, registry_version),
            card=card,
            thresholds=thresholds,
            labels=frozenset(predictor.labels),
        )

    def _start_tasks(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.get_running_loop().create_task(self._watch_pointer()),
                asyncio.get_running_loop().create_task(self._profile_loop()),
            ]

    async def _watch_pointer(self) -> None:
        """Poll the production pointer; when its content changes, load the new version and swap it in."""
        while True:
            interval = self.settings["watch_interval_s"]
            await asyncio.sleep(interval or 1.0)
            pointer = pointer_path(self.settings, self.root)
            if not interval or pointer is None:
                continue
            try:
                seen = pointer.read_text() if pointer.is_file() else None
            except OSError:
                continue
            if seen != self._pointer_seen:
                self._pointer_seen = seen
                await self.reload()

    async def _profile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings["monitoring"]["flush_s"] or 5.0)
            await self._run_io(self._write_profiles, self._take_features())

    def _take_features(self) -> list[tuple[list[str], list[dict]]]:
        pending, queue = [], self._pending_features
        while queue:  # popleft is atomic: a row the model thread appends meanwhile waits for the next flush
            pending.append(queue.popleft())
        return pending

    def _flush_profiles(self) -> None:
        self._write_profiles(self._take_features())

    def _write_profiles(self, pending: list[tuple[list[str], list[dict]]]) -> None:
        """Profile the buffered rows' features (the texts are dropped here) and close a due window."""
        from intentops.monitor.features import utterance_features

        if self.profiles is None:
            return
        texts = [t for batch, _ in pending for t in batch]
        preds = [
            {"intent": r["intent"], "confidence": r["confidence"], "top_k": store_top_k(r)}
            for _, rows in pending
            for r in rows
        ]
        try:
            if texts:
                self.profiles.log(utterance_features(texts, self.vocab, preds))
            self.profiles.roll_if_due()
        except Exception as err:  # monitoring must never take the API down
            log.error("profile window write failed: %s", err)

    async def _run_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    # --- inference ---------------------------------------------------------------------------------------
    # max_concurrent_batches > 1: Serve closes a batch after batch_wait_timeout_s even while the model is
    # busy, so under load it forms many small batches; letting them all reach `_infer` (instead of queueing
    # on Serve's semaphore) lets the next model call take every text that arrived during the last one.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=32)
    async def _predict_batch(self, texts: list[str]) -> list[tuple[dict, dict]]:
        """Texts of concurrent requests -> (API row, facts about the model call that served it) per text."""
        return await self._infer(texts)

    async def _infer(self, texts: list[str]) -> list[tuple[dict, dict]]:
        """Group commit: whoever gets the model next runs one call for every pending text (up to max_batch_size)."""
        mine = asyncio.get_running_loop().create_future()
        self._pending.append((texts, mine))
        async with self._model_lock:
            if not mine.done():
                await self._run_pending()
        return await mine

    async def _run_pending(self) -> None:
        cap = self.settings["batching"]["max_batch_size"]
        take, n = [], 0
        while self._pending and (not take or n + len(self._pending[0][0]) <= cap):
            item = self._pending.pop(0)
            take.append(item)
            n += len(item[0])
        texts = [t for batch, _ in take for t in batch]
        model = self.model  # one model for the whole call, even mid-swap
        try:
            if self._in_flight <= 1:
                # Alone: nothing to overlap with the model call, so skip the two thread hand-offs (each a
                # wake-up that waits for a CPU on a busy host).
                rows, call = self._call(model, texts)
            else:
                # Under load: one hop to the model thread per call (model, rows, metrics, ledger write), so
                # the event loop keeps parsing the requests that will form the next call meanwhile.
                rows, call = await asyncio.get_running_loop().run_in_executor(
                    self._infer_pool, self._call, model, texts
                )
        except Exception as err:
            for _, fut in take:
                fut.set_exception(err)
            return
        pos = 0
        for batch, fut in take:
            fut.set_result([(row, call) for row in rows[pos : pos + len(batch)]])
            pos += len(batch)

    def _call(self, model: LoadedModel, texts: list[str]) -> tuple[list[dict], dict]:
        """One model call (in the model thread): rows with ids, metrics, profile features, then the ledger write.

        The write finishes before any of these requests is answered, so a returned prediction id is always
        known to /v1/feedback.
        """
        t0 = time.perf_counter()
        rows = shape_predictions(model.predictor.predict(texts, top_k=self.settings["top_k"]), model.version)
        t1 = time.perf_counter()
        self._observe(model.version, rows)
        if self.profiles is not None:
            self._pending_features.append((texts, rows))
        if self.engine is not None:
            from intentops.serve_ledger import record

            record(self.engine, texts, rows)
        t2 = time.perf_counter()
        return rows, {
            "batch_size": len(rows),
            "model_ms": round((t1 - t0) * 1000, 2),
            "record_ms": round((t2 - t1) * 1000, 2),
        }

    def _observe(self, version: str, rows: list[dict]) -> None:
        """Metrics for one model call, counted per call (one increment per intent and per reason)."""
        self.m_batch.observe(len(rows))
        for intent, n in Counter(r["intent"] for r in rows).items():
            self.m_predictions.inc(n, tags={"intent": intent, "model_version": version})
        for reason, n in Counter(r["reason"] for r in rows if r["reason"] is not None).items():
            self.m_review.inc(n, tags={"reason": reason, "model_version": version})
        tags = {"model_version": version}
        for r in rows:
            self.m_confidence.observe(r["confidence"], tags=tags)

    # --- routes ----------------------------------------------------------------------------------------------
    @api.post("/v1/predict", response_model=PredictResponse, responses={413: {}, 422: {}})
    async def predict(self, body: PredictRequest, request: Request) -> Response:
        """Intent, confidence, top-k and out-of-scope flags for each text, with a prediction id for /v1/feedback."""
        s = self.settings
        texts = request_texts(body, s["max_texts"], s["max_text_chars"])
        self._in_flight += 1
        try:
            if len(texts) == 1:
                results = [await self._predict_batch(texts[0])]
            else:  # a list is a batch already: it joins the next model call whole, with whatever else is pending
                results = await self._infer(texts)
        finally:
            self._in_flight -= 1
        rows = [r for r, _ in results]
        call = max((c for _, c in results), key=lambda c: c["batch_size"])
        version = rows[0]["model_version"]
        flagged = sum(r["out_of_scope"] for r in rows)
        info = request.scope.get("intentops")
        if info is not None:
            info.update(model_version=version, n_texts=len(rows), out_of_scope=flagged, **call)
        body = json.dumps(
            {"request_id": _request_id(), "model_version": version, "predictions": rows},
            separators=(",", ":"),
        )
        return Response(body, media_type="application/json")

    @api.post("/v1/feedback", response_model=FeedbackResponse, status_code=201, responses={404: {}, 422: {}})
    async def feedback(self, body: FeedbackRequest) -> JSONResponse:
        """Store a corrected label for a prediction id this API returned (idempotent with `feedback_id`)."""
        from intentops.feedback import store
        from intentops.serve_ledger import known

        model = self.model
        if body.label not in model.labels:
            raise RequestError(
                422,
                f"label {body.label!r} is not in the model's taxonomy",
                where="request body: label",
                fix="use one of the intents listed by GET /v1/model",
            )
        if self.engine is None:
            raise RequestError(
                503,
                "feedback is off: this deployment does not record predictions",
                where="serving.store.record_predictions",
                fix="turn it on in serving/config.yaml",
            )
        if not await self._run_io(known, self.engine, body.prediction_id):
            raise RequestError(
                404,
                f"unknown prediction id {body.prediction_id!r}",
                where="request body: prediction_id",
                fix="send a prediction_id returned by POST /v1/predict",
            )
        stored = await self._run_io(
            lambda: store.add_feedback(
                self.engine, body.prediction_id, body.label, body.annotator, body.feedback_id
            )
        )
        return JSONResponse(
            {"prediction_id": body.prediction_id, "label": body.label, "stored": stored}, status_code=201
        )

    @api.get("/v1/model")
    async def model_info(self) -> dict:
        """The model card of the version being served, its labels and review thresholds."""
        m = self.model
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
        if self.model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model_version": self.model.version})

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> dict:
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="intentops API")

    def __del__(self) -> None:
        self._flush_profiles()
        if self.profiles is not None:
            self.profiles.flush()


# `serve run serving/config.yaml` (import_path serving.app:app); binding creates nothing until Serve runs it.
app = IntentService.bind()
