"""The real Ray Serve app (intentops.api.service) on loopback: routes, batching, bad requests, API key, feedback, hot swap.

One Ray + Serve instance for the module. The bundles are tiny untrained BiLSTMs over the packaged
tokenizer: v1 is biased to one intent (confident, never needs review), v2 is near uniform (always does).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from support import ROOT

KEY = "test-key-123"
AUTH = {"X-API-Key": KEY}
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked"]


def write_tiny_bundle(dest: Path, version: str, confident: bool) -> None:
    """A real Predictor bundle (untrained): confident=True pushes every text to LABELS[0]."""
    import torch

    from intentops.inference.predictor import TorchPredictor
    from intentops.models.bilstm import BiLSTMClassifier
    from intentops.models.tokens import TokenFeaturizer

    featurizer = TokenFeaturizer(max_length=32)
    net_kwargs = {"vocab_size": featurizer.net_kwargs()["vocab_size"], "n_classes": len(LABELS)}
    net_config = {
        "_target_": "intentops.models.bilstm.BiLSTMClassifier",
        "embed_dim": 8,
        "hidden": 8,
        "dropout": 0.0,
    }
    torch.manual_seed(0)
    net = BiLSTMClassifier(**net_kwargs, **{k: v for k, v in net_config.items() if k != "_target_"})
    with torch.no_grad():
        net.classifier.bias[0] = 8.0 if confident else 0.0
    TorchPredictor(featurizer, net, LABELS).save(dest, net_config, net_kwargs, {"version": version})
    (dest / "card.json").write_text(json.dumps({"version": version, "metrics": {"test/macro_f1": 0.5}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, work dir) of the app serving registry version v1, with the API key required."""
    import ray
    from ray import serve

    from intentops.api.service import IntentService
    from intentops.feedback import store

    work = tmp_path_factory.mktemp("serving")
    registry = work / "registry"
    write_tiny_bundle(registry / "v1", "v1", confident=True)
    write_tiny_bundle(registry / "v2", "v2", confident=False)
    (registry / "production").write_text("v1\n")
    db = work / "queue.db"
    engine = store.make_engine(f"sqlite:///{db}")
    store.upgrade(engine)
    engine.dispose()
    (work / "vocab.json").write_text(json.dumps({"min_count": 1, "tokens": ["my", "card", "lost"]}))

    user_config = {
        "bundle": "production",
        "registry_dir": str(registry),
        "watch_interval_s": 0.2,
        "max_texts": 8,
        "max_text_chars": 200,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "store": {"record_predictions": True, "db": str(db)},
        "monitoring": {
            "enabled": True,
            "vocab": str(work / "vocab.json"),
            "profiles": str(work / "profiles"),
            "window_max_rows": 20,
            "window_max_seconds": 3600,
            "flush_s": 0.3,
        },
    }
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        service = IntentService.options(
            user_config=user_config,
            ray_actor_options={
                "num_cpus": 1,
                "runtime_env": {
                    "env_vars": {
                        "INTENTOPS_API_KEY": KEY,
                        "INTENTOPS_ROOT": str(ROOT),
                        # as serving/config.yaml deploys it: the routes on the replica's own event loop
                        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                    }
                },
            },
            logging_config={"encoding": "JSON", "enable_access_log": False},
        )
        serve.run(service.bind(), name="intentops", route_prefix="/")
        yield f"http://127.0.0.1:{port}", work
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=30) as c:
        yield c


def predict(client, body, headers=AUTH):
    return client.post("/v1/predict", json=body, headers=headers)


def test_predict_one_text_and_a_list(client):
    r = predict(client, {"text": "my card has not arrived"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v1" and body["request_id"]
    (p,) = body["predictions"]
    assert p["intent"] == "card_arrival" and p["out_of_scope"] is False and p["reason"] is None
    assert p["needs_review"] is False
    assert len(p["top_k"]) == 3 and p["top_k"][0]["confidence"] == p["confidence"] > 0.9
    assert set(p) == {
        "prediction_id",
        "intent",
        "confidence",
        "top_k",
        "out_of_scope",
        "reason",
        "needs_review",
        "model_version",
    }
    r = predict(client, {"texts": ["lost my card", "exchange rate?", "pin blocked"]})
    preds = r.json()["predictions"]
    assert r.status_code == 200 and len(preds) == 3 and len({p["prediction_id"] for p in preds}) == 3


def test_health_ready_model_card_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": "v1"}
    card = client.get("/v1/model", headers=AUTH).json()
    assert card["version"] == "v1" and card["labels"] == sorted(LABELS)
    assert card["thresholds"]["source"] == "config" and card["card"]["metrics"]["test/macro_f1"] == 0.5
    assert "/v1/predict" in client.get("/openapi.json", headers=AUTH).json()["paths"]
    assert client.get("/docs", headers=AUTH).status_code == 200


def test_concurrent_requests_are_batched(served):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served[0], timeout=30, headers=AUTH) as c:
            return await asyncio.gather(
                *(c.post("/v1/predict", json={"text": f"card number {i}"}) for i in range(24))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 24
    # Each request's log line carries the size of the model call that served it.
    sizes = [rec["batch_size"] for rec in replica_log_records() if rec.get("path") == "/v1/predict"]
    assert max(sizes) > 1, sizes


def replica_log_records() -> list[dict]:
    import ray

    ctx = ray.get_runtime_context()  # Serve's logs: <temp dir>/<session>/logs/serve
    logs = Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs" / "serve"
    records = []
    for path in logs.glob("replica_*IntentService*.log"):
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
    return records


BAD_REQUESTS = [
    ("empty body", "POST", "/v1/predict", {"content": b""}, 422),
    (
        "invalid json",
        "POST",
        "/v1/predict",
        {"content": b"{not json", "headers": {**AUTH, "content-type": "application/json"}},
        422,
    ),
    ("wrong type", "POST", "/v1/predict", {"json": {"text": 42}}, 422),
    ("texts not a list", "POST", "/v1/predict", {"json": {"texts": "hello"}}, 422),
    ("both text and texts", "POST", "/v1/predict", {"json": {"text": "a", "texts": ["b"]}}, 422),
    ("neither", "POST", "/v1/predict", {"json": {}}, 422),
    ("unknown field", "POST", "/v1/predict", {"json": {"txt": "hello"}}, 422),
    ("empty string", "POST", "/v1/predict", {"json": {"text": "   "}}, 422),
    ("empty list", "POST", "/v1/predict", {"json": {"texts": []}}, 422),
    ("oversized text", "POST", "/v1/predict", {"json": {"text": "a" * 201}}, 413),
    ("oversized batch", "POST", "/v1/predict", {"json": {"texts": ["hi"] * 9}}, 413),
    ("missing key", "POST", "/v1/predict", {"json": {"text": "hi"}, "headers": {}}, 401),
    ("wrong key", "POST", "/v1/predict", {"json": {"text": "hi"}, "headers": {"X-API-Key": "nope"}}, 401),
    ("wrong bearer", "GET", "/v1/model", {"headers": {"Authorization": "Bearer nope"}}, 401),
    (
        "unknown prediction id",
        "POST",
        "/v1/feedback",
        {"json": {"prediction_id": "nope", "label": "card_arrival"}},
        404,
    ),
    (
        "label not in taxonomy",
        "POST",
        "/v1/feedback",
        {"json": {"prediction_id": "x", "label": "pizza"}},
        422,
    ),
    ("feedback without label", "POST", "/v1/feedback", {"json": {"prediction_id": "x"}}, 422),
    ("wrong method", "GET", "/v1/predict", {}, 405),
    ("unknown route", "GET", "/v1/nothing", {}, 404),
]


def test_bad_requests_get_a_4xx_and_the_server_stays_healthy(client):
    for name, method, path, kwargs, status in BAD_REQUESTS:
        kwargs = {"headers": AUTH, **kwargs}
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        if (
            r.headers.get("content-type") == "application/json"
            and status in (401, 404, 413, 422)
            and path != "/v1/nothing"
        ):
            assert r.json().get("error") and r.json().get("fix"), (name, r.text)
        assert client.get("/healthz").status_code == 200, name
        assert predict(client, {"text": "still fine?"}).status_code == 200, name


def test_api_key_is_needed_everywhere_but_the_probes(client):
    for path in ("/healthz", "/readyz"):
        assert client.get(path).status_code == 200
    for path in ("/v1/model", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 401
    assert client.get("/v1/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert predict(client, {"text": "hi"}, headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_feedback_is_stored_once_per_feedback_id(client, served):
    from intentops.feedback import store

    pid = predict(client, {"text": "card please"}).json()["predictions"][0]["prediction_id"]
    body = {
        "prediction_id": pid,
        "label": "lost_or_stolen_card",
        "annotator": "agent-7",
        "feedback_id": "fb-1",
    }
    first = client.post("/v1/feedback", json=body, headers=AUTH)
    again = client.post("/v1/feedback", json=body, headers=AUTH)
    assert (first.status_code, first.json()["stored"]) == (201, True)
    assert (again.status_code, again.json()["stored"]) == (201, False)
    engine = store.make_engine(f"sqlite:///{served[1] / 'queue.db'}")
    rows = [r for r in store.table_rows(engine, store.feedback) if r["prediction_id"] == pid]
    engine.dispose()
    assert [(r["label"], r["annotator"]) for r in rows] == [("lost_or_stolen_card", "agent-7")]


def test_hot_swap_under_traffic_fails_nothing(served):
    """Move the production pointer while 4 clients send requests: no failure, and the version changes."""
    base, work = served
    results: list[tuple[int, str | None]] = []

    async def client_loop(c: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                r = await c.post("/v1/predict", json={"text": "where is my card"})
                results.append((r.status_code, r.json()["model_version"] if r.status_code == 200 else None))
            except httpx.HTTPError:
                results.append((0, None))

    async def run() -> None:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=AUTH) as c:
            tasks = [asyncio.create_task(client_loop(c, stop)) for _ in range(4)]
            await asyncio.sleep(1.0)
            tmp = work / "registry" / "production.tmp"
            tmp.write_text("v2\n")
            os.replace(tmp, work / "registry" / "production")  # what Registry.set_production does
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(v == "v2" for _, v in results[-4:]):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(run())
    assert [s for s, _ in results if s != 200] == []
    versions = [v for _, v in results]
    assert versions[0] == "v1" and versions[-1] == "v2", versions
    assert "v1" not in versions[versions.index("v2") :]  # once swapped, never back

    # v2 is unsure of everything: its predictions need review, and their texts reach the queue.
    with httpx.Client(base_url=base, timeout=30, headers=AUTH) as c:
        p = c.post("/v1/predict", json={"text": "review me please"}).json()["predictions"][0]
        assert p["needs_review"] is p["out_of_scope"] is True and p["reason"] == "low_confidence"
        assert c.get("/v1/model").json()["version"] == "v2"
    from intentops.feedback import store

    engine = store.make_engine(f"sqlite:///{work / 'queue.db'}")
    queued = {i["prediction_id"]: i for i in store.queue_items(engine)}
    engine.dispose()
    assert queued[p["prediction_id"]]["text"] == "review me please"
    assert queued[p["prediction_id"]]["reason"] == "low_confidence"
    assert all(i["model_version"] == "v2" for i in queued.values())


def test_profiles_hold_features_never_text(served):
    """The traffic above closed at least one 20-row window; the files hold no request text."""
    windows = sorted((served[1] / "profiles").glob("window-*.bin"))
    deadline = time.monotonic() + 10
    while not windows and time.monotonic() < deadline:
        time.sleep(0.3)
        windows = sorted((served[1] / "profiles").glob("window-*.bin"))
    assert windows
    assert all(b"where is my card" not in w.read_bytes() for w in windows)


@pytest.fixture(scope="module")
def oos_app(served, tmp_path_factory):
    """(url prefix, queue db) of a second app on the same Serve instance: the tiny trained and exported model
    (test_export's project), its bundle calibrated for energy-based out-of-scope detection."""
    from ray import serve

    from integration.test_export import exported_project
    from intentops.api.service import IntentService
    from intentops.inference.ood import choose_threshold, energy_score
    from intentops.inference.predictor import Predictor
    from intentops.io import write_json

    root = tmp_path_factory.mktemp("oos") / "repo"
    cfg = exported_project(tmp_path_factory, root)
    bundle = root / cfg.paths.bundle_dir
    # What `calibrate` does for a dataset without out-of-scope rows: keep 95 % of the in-scope validation
    # rows (target_without_oos: coverage), flag what scores beyond them.
    val = pd.read_parquet(root / cfg.paths.val)["text"].tolist()
    scores = energy_score(Predictor.load(bundle).logits(val))
    threshold = choose_threshold(
        scores, np.zeros(len(val), bool), np.ones(len(val), bool), True, {"coverage": 0.95}
    )
    write_json(
        bundle / "calibration.json",
        {
            "temperature": 1.0,
            "ood": {"method": "energy", "threshold": threshold, "higher_is_ood": True},
            "review": {"min_confidence": 0.0, "min_margin": 0.0},
            "oos_label": "oos",
        },
    )
    user_config = {
        "bundle": str(bundle),
        "watch_interval_s": 0,
        "store": {"record_predictions": True, "db": str(served[1] / "queue.db")},
        "monitoring": {"enabled": False},
    }
    service = IntentService.options(
        name="IntentServiceOOS",
        user_config=user_config,
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"INTENTOPS_ROOT": str(ROOT)}}},
        logging_config={"encoding": "JSON", "enable_access_log": False},
    )
    serve.run(service.bind(), name="oos", route_prefix="/oos")
    try:
        yield f"{served[0]}/oos", served[1] / "queue.db"
    finally:
        serve.delete("oos")


def test_out_of_scope_queries_are_flagged_with_a_reason_and_queued(oos_app):
    """An in-scope message is routed; a clearly out-of-domain one comes back out_of_scope and goes to the queue."""
    from intentops.feedback import store

    url, db = oos_app
    with httpx.Client(base_url=url, timeout=60) as c:
        card = c.get("/v1/model").json()
        r = c.post(
            "/v1/predict",
            json={"texts": ["my card was stolen", "what is the weather like in paris tomorrow"]},
        )
    assert r.status_code == 200, r.text
    assert card["thresholds"]["out_of_scope"]["method"] == "energy"
    inside, outside = r.json()["predictions"]
    assert (inside["intent"], inside["out_of_scope"], inside["reason"]) == (
        "lost_or_stolen_card",
        False,
        None,
    )
    assert (outside["out_of_scope"], outside["reason"], outside["needs_review"]) == (
        True,
        "out_of_distribution",
        True,
    )
    engine = store.make_engine(f"sqlite:///{db}")
    queued = {i["prediction_id"]: i for i in store.queue_items(engine)}
    recorded = {r["prediction_id"]: r for r in store.table_rows(engine, store.predictions)}
    engine.dispose()
    assert (
        inside["prediction_id"] not in queued and recorded[inside["prediction_id"]]["needs_review"] is False
    )
    item = queued[outside["prediction_id"]]
    assert (item["text"], item["reason"]) == (
        "what is the weather like in paris tomorrow",
        "out_of_distribution",
    )
    assert (
        item["suggested_intent"] == outside["intent"] and recorded[outside["prediction_id"]]["needs_review"]
    )
