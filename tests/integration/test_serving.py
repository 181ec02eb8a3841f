"""The real Ray Serve app (intentops.api.service) on loopback: routes, batching, bad requests, API key, feedback, hot swap.

One Ray + Serve instance for the module. The bundles are tiny sealed ONNX bundles (tests/support.py
write_tiny_onnx_bundle), registered under their content versions: v1 is biased to one intent (confident, never
needs review), v2 is near uniform (always does).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from support import deploy_intent_service, new_store, serve_on_loopback, write_tiny_onnx_bundle

KEY = "test-key-123"
AUTH = {"X-API-Key": KEY}
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked"]


def write_tiny_bundle(dest: Path, confident: bool) -> str:
    """A real, sealed ONNX bundle (untrained): confident=True pushes every text to LABELS[0]; returns its version."""
    return write_tiny_onnx_bundle(dest, LABELS, confident, card={"metrics": {"test/macro_f1": 0.5}})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, work dir, {"v1": version, "v2": version}) of the app serving registry version v1, with the API
    key required."""
    from intentops.inference.registry import Registry

    work = tmp_path_factory.mktemp("serving")
    registry = work / "registry"
    bundles = {}
    for name, confident in (("v1", True), ("v2", False)):
        bundles[name] = write_tiny_bundle(work / "bundles" / name, confident)
        Registry.at(registry).add(work / "bundles" / name, bundles[name])
    (registry / "production").write_text(bundles["v1"] + "\n")
    db = new_store(work / "queue.db")
    (work / "vocab.json").write_text(json.dumps({"min_count": 1, "tokens": ["my", "card", "lost"]}))

    user_config = {
        "bundle": "production",
        "registry": str(registry),
        "watch_interval_s": 0.2,
        "max_body_bytes": 20000,
        "health": {"canary_interval_s": 0.5, "canary_timeout_s": 10.0},
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
    with serve_on_loopback() as url:
        deploy_intent_service(user_config, env={"INTENTOPS_API_KEY": KEY})
        yield url, work, bundles


def predict(client, body, headers=AUTH):
    return client.post("/v1/predict", json=body, headers=headers)


def wait_stored(db: Path, prediction_ids: list[str], timeout: float = 15) -> tuple[dict, dict]:
    """(review queue, predictions) by prediction id, once the replica's writer stored every id (it writes
    off the request path, every serving.store.flush_s)."""
    from intentops.feedback import store

    engine = store.make_engine(f"sqlite:///{db}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            recorded = {r["prediction_id"]: r for r in store.table_rows(engine, store.predictions)}
            if set(prediction_ids) <= recorded.keys() or time.monotonic() > deadline:
                queued = {i["prediction_id"]: i for i in store.queue_items(engine)}
                return queued, recorded
            time.sleep(0.1)
    finally:
        engine.dispose()


def test_predict_one_text_and_a_list(client, served):
    r = predict(client, {"text": "my card has not arrived"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == served[2]["v1"] and body["request_id"]
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


def test_health_ready_model_card_and_docs(client, served):
    v1 = served[2]["v1"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert (ready["status"], ready["model_version"], ready["store"]["up"]) == ("ready", v1, True)
    card = client.get("/v1/model", headers=AUTH).json()
    assert card["version"] == v1 and card["labels"] == sorted(LABELS)
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
    ("NUL in a text", "POST", "/v1/predict", {"json": {"text": "card\x00 lost"}}, 422),
    (
        "lone surrogate (valid JSON)",
        "POST",
        "/v1/predict",
        {
            "content": b'{"text": "card \\ud800 lost"}',
            "headers": {**AUTH, "content-type": "application/json"},
        },
        422,
    ),
    (
        "terminal escape in a feedback label",
        "POST",
        "/v1/feedback",
        {"json": {"prediction_id": "x", "label": "card\x1b[31m"}},
        422,
    ),
    ("body over max_body_bytes", "POST", "/v1/predict", {"content": b"x" * 30000}, 413),
    (
        "chunked body over max_body_bytes",
        "POST",
        "/v1/predict",
        {"content": iter([b'{"text": "' + b" " * 15000, b" " * 15000 + b'"}'])},
        413,
    ),
]


def test_bad_requests_get_a_4xx_and_the_server_stays_healthy(client):
    for name, method, path, kwargs, status in BAD_REQUESTS:
        kwargs = {"headers": AUTH, **kwargs}
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        if status in (401, 404, 405, 413, 422):  # the API's own error shape, whoever refused it
            assert r.json().get("error") and r.json().get("fix"), (name, r.text)
        assert client.get("/healthz").status_code == 200, name
        assert predict(client, {"text": "still fine?"}).status_code == 200, name


def test_a_list_request_names_every_bad_text_in_one_answer(client):
    r = predict(client, {"texts": ["my card", "a\x1bb", "fine", "\x7f", "  "]})
    assert r.status_code == 422, r.text
    body = r.json()
    assert [p["index"] for p in body["problems"]] == [1, 3, 4]
    assert "texts[1]" in body["where"] and "texts[3]" in body["where"] and "texts[4]" in body["where"]
    assert "U+001B" in body["problems"][0]["error"]


def test_a_bundle_that_fails_verification_is_refused_and_retried(client, served):
    """Point production at a bundle whose labels.json was changed after sealing: the replica keeps serving the
    model it has, says why in /readyz (degraded) and /v1/model, and retries; once the pointer is back, the
    failure clears."""
    from intentops.inference.registry import Registry
    from support import write_tiny_onnx_bundle

    _, work, _ = served
    registry = Registry.at(work / "registry")
    before = registry.production()
    serving = client.get("/v1/model", headers=AUTH).json()["version"]
    version = write_tiny_onnx_bundle(work / "bundles" / "v3", LABELS[::-1], True)
    registry.add(work / "bundles" / "v3", version)
    (registry.root / version / "labels.json").write_text(json.dumps(LABELS))  # tampered after sealing
    registry.set_production(version, event="promote", reason="test: a tampered bundle")
    try:
        ready = poll(client, lambda: client.get("/readyz").json(), lambda b: b["status"] == "degraded")
        assert "model load failing" in ready["reasons"][0] and "labels.json" in ready["reasons"][0]
        info = client.get("/v1/model", headers=AUTH).json()
        assert info["version"] == serving and info["reload"]["attempts"] >= 1
        assert predict(client, {"text": "still serving?"}).json()["model_version"] == serving
    finally:
        registry.set_production(before, event="rollback", reason="test: back")
    poll(client, lambda: client.get("/readyz").json(), lambda b: b["status"] == "ready", timeout=20)
    assert client.get("/v1/model", headers=AUTH).json()["reload"] is None


def poll(client, get, done, timeout: float = 10.0):
    """`get()` until `done(result)` or the timeout; the last result."""
    deadline = time.monotonic() + timeout
    result = get()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(0.2)
        result = get()
    assert done(result), result
    return result


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
    base, work, bundles = served
    v1, v2 = bundles["v1"], bundles["v2"]
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
            tmp.write_text(v2 + "\n")
            os.replace(tmp, work / "registry" / "production")  # what Registry.set_production does
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(v == v2 for _, v in results[-4:]):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(run())
    assert [s for s, _ in results if s != 200] == []
    versions = [v for _, v in results]
    assert versions[0] == v1 and versions[-1] == v2, versions
    assert v1 not in versions[versions.index(v2) :]  # once swapped, never back

    # v2 is unsure of everything: its predictions need review, and their texts reach the queue.
    with httpx.Client(base_url=base, timeout=30, headers=AUTH) as c:
        p = c.post("/v1/predict", json={"text": "review me please"}).json()["predictions"][0]
        # in the taxonomy but unsure: reviewed, not out of scope (out_of_scope means out of distribution only)
        assert p["needs_review"] is True and p["out_of_scope"] is False and p["reason"] == "low_confidence"
        assert c.get("/v1/model").json()["version"] == v2

    queued, _ = wait_stored(work / "queue.db", [p["prediction_id"]])
    assert queued[p["prediction_id"]]["text"] == "review me please"
    assert queued[p["prediction_id"]]["reason"] == "low_confidence"
    # v1 was sure of everything: only the random audit sample (serving.store.audit_share) queued its texts.
    assert all(i["model_version"] == v2 for i in queued.values() if not i["audit"])


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
    from intentops.inference.bundle import seal
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
    seal(bundle)  # a changed calibration is a new version: re-version and re-list the bundle
    user_config = {
        "bundle": str(bundle),
        "watch_interval_s": 0,
        # audit_share 0: this module asserts which texts need review; the random 1 % audit sample would
        # queue a calm text now and then (CI saw it).
        "store": {"record_predictions": True, "db": str(served[1] / "queue.db"), "audit_share": 0.0},
        "monitoring": {"enabled": False},
    }
    deploy_oos(user_config)
    try:
        yield f"{served[0]}/oos", served[1] / "queue.db", bundle, user_config
    finally:
        serve.delete("oos")


def deploy_oos(user_config: dict) -> None:
    """Deploy (or reconfigure in place) the oos app beside the module's app."""
    deploy_intent_service(
        user_config, app="oos", route_prefix="/oos", deployment="IntentServiceOOS", num_cpus=0.5
    )


def test_out_of_scope_queries_are_flagged_with_a_reason_and_queued(oos_app):
    """An in-scope message is routed; a clearly out-of-domain one comes back out_of_scope and goes to the queue."""

    url, db, *_ = oos_app
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
    queued, recorded = wait_stored(db, [inside["prediction_id"], outside["prediction_id"]])
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


def test_a_failing_store_never_puts_the_text_in_a_log(oos_app):
    """Lock the store while an out-of-scope text (queued with its text) is served: the writer fails and logs
    it, yet no log under Ray's session folder holds the text; once the lock is gone, the text is queued."""
    import ray

    url, db, *_ = oos_app
    marker = "what is the weather like in paris tomorrow zq7731"
    lock = sqlite3.connect(db, timeout=5)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            pred = c.post("/v1/predict", json={"text": marker}).json()["predictions"][0]
            assert pred["needs_review"], pred  # so its text goes to the review queue
            poll(c, lambda: c.get("/readyz").json(), lambda b: b["status"] == "degraded")
    finally:
        lock.rollback()
        lock.close()
    queued, _ = wait_stored(db, [pred["prediction_id"]])
    assert queued[pred["prediction_id"]]["text"] == marker
    ctx = ray.get_runtime_context()
    logs = Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs"
    failures = [p for p in logs.rglob("*") if p.is_file() and b"unavailable" in p.read_bytes()]
    assert failures, "the writer logged the store failure"
    assert [p for p in logs.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()] == []


def test_an_unfit_int8_graph_is_served_as_fp32_unless_forced(oos_app):
    """`variant: int8` on a bundle whose export marked int8 unfit: the replica serves fp32 and says so in
    /v1/model and /readyz; `force_variant: true` serves int8. (Last in the module: it re-seals the bundle.)"""
    from intentops.inference.bundle import BUNDLE_META, seal
    from intentops.io import write_json

    url, _, bundle, user_config = oos_app
    meta = json.loads((bundle / BUNDLE_META).read_text())
    assert "int8" in meta["variants"], meta  # export.quantize is on in the test project
    check = {"accuracy": 0.5, "fp32_accuracy": 0.6, "drop_pt": 10.0, "max_drop_pt": 0.5, "fit": False}
    write_json(bundle / BUNDLE_META, {**meta, "variant_checks": {"int8": check}})
    seal(bundle)
    with httpx.Client(base_url=url, timeout=60) as c:
        deploy_oos({**user_config, "variant": "int8"})
        variant = c.get("/v1/model").json()["variant"]
        assert (variant["requested"], variant["served"]) == ("int8", "fp32")
        assert "10.0 pt" in variant["reason"] and "max_int8_drop" in variant["reason"]
        assert c.get("/readyz").json()["variant"] == variant
        assert c.post("/v1/predict", json={"text": "my card was stolen"}).status_code == 200

        deploy_oos({**user_config, "variant": "int8", "force_variant": True})
        assert c.get("/v1/model").json()["variant"] == {"requested": "int8", "served": "int8", "reason": None}
        assert c.post("/v1/predict", json={"text": "my card was stolen"}).status_code == 200
