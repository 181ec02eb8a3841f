"""The shadow challenger in the real Ray Serve app: the staged candidate scores every text (sample 1.0) beside
the champion, its rows reach the store with both versions, a broken candidate fails no request, and the
responses are the same bytes with the shadow on or off.

One Ray + Serve instance for the module; tiny sealed ONNX bundles (tests/support.py): v1 in production
(confident, always LABELS[0]), v2 staged as the candidate (near uniform).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from support import deploy_intent_service, new_store, serve_on_loopback, write_tiny_onnx_bundle

pytestmark = pytest.mark.slow  # a Ray cluster and a Serve app

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked"]
TEXTS = ["my card has not arrived", "I lost my card", "what is the exchange rate", "top up failed"]


def user_config(work: Path, shadow: dict) -> dict:
    return {
        "bundle": "production",
        "registry": str(work / "registry"),
        "bundle_cache": str(work / "cache"),
        "watch_interval_s": 0.2,
        "health": {"canary_interval_s": 0.5, "canary_timeout_s": 10.0},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.0},
        "store": {"record_predictions": True, "db": str(work / "queue.db"), "flush_s": 0.1},
        "monitoring": {"enabled": False},
        "shadow": {
            "enabled": True,
            "sample": 1.0,
            "queue_max": 1000,
            "batch_size": 8,
            "flush_s": 0.1,
            **shadow,
        },
    }


def deploy(work: Path, shadow: dict) -> None:
    """Deploy (or reconfigure in place) the app with these shadow settings."""
    deploy_intent_service(user_config(work, shadow))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, work dir, {"v1", "v2"}): v1 in production, v2 the staged candidate, shadow at sample 1.0."""
    from intentops.inference.registry import Registry

    work = tmp_path_factory.mktemp("shadow")
    registry = Registry.at(work / "registry")
    versions = {}
    for name, confident in (("v1", True), ("v2", False)):
        versions[name] = write_tiny_onnx_bundle(work / "bundles" / name, LABELS, confident)
    registry.add(work / "bundles" / "v1", versions["v1"])
    registry.set_production(versions["v1"], "promote", "champion")
    registry.stage(work / "bundles" / "v2", versions["v2"], "challenger")
    new_store(work / "queue.db")
    with serve_on_loopback() as url:
        deploy(work, {})
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, work, versions


def shadow_rows(work: Path) -> dict[str, dict]:
    from intentops.feedback import store

    engine = store.make_engine(f"sqlite:///{work / 'queue.db'}")
    try:
        return {r["prediction_id"]: r for r in store.table_rows(engine, store.shadow_scores)}
    finally:
        engine.dispose()


def wait_for(check, timeout: float = 20.0, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll)


def predict_ids(client: httpx.Client, texts: list[str]) -> list[str]:
    r = client.post("/v1/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    return [p["prediction_id"] for p in r.json()["predictions"]]


def test_every_text_is_shadowed_and_stored_with_both_versions(served):
    client, work, v = served
    # the candidate loads after the first pointer poll: keep predicting until its rows appear
    ids: list[str] = []

    def shadowed() -> bool:
        ids.extend(predict_ids(client, TEXTS))
        return bool(set(ids) & shadow_rows(work).keys())

    assert wait_for(shadowed), "the candidate never scored a text"
    fresh = predict_ids(client, TEXTS)
    rows = wait_for(lambda: (s := shadow_rows(work)) and set(fresh) <= s.keys() and s)
    assert rows, "the shadow rows of the last request never reached the store"
    for pid in fresh:
        r = rows[pid]
        assert (r["champion_version"], r["challenger_version"]) == (v["v1"], v["v2"])
        assert r["champion_intent"] == LABELS[0] and r["champion_confidence"] > 0.9  # the confident champion
        assert r["challenger_intent"] in LABELS and r["challenger_confidence"] < 0.9  # the near-uniform one
        assert r["challenger_ms"] > 0 and 1 <= r["challenger_batch"] <= 8


def test_responses_are_the_same_bytes_with_the_shadow_on_or_off(served):
    client, work, _ = served

    def answers() -> list[bytes]:
        out = []
        for text in TEXTS:
            body = client.post("/v1/predict", json={"text": text}).json()
            body.pop("request_id")
            for p in body["predictions"]:
                p.pop("prediction_id")  # a new id per prediction, whatever the shadow does
            out.append(json.dumps(body).encode())
        return out

    on = answers()
    deploy(work, {"enabled": False})
    try:
        off = answers()
    finally:
        deploy(work, {})
    assert on == off


def test_a_broken_candidate_fails_no_request(served):
    """A newly staged candidate whose files no longer verify: never loaded, and every request still answers."""
    from intentops.inference.registry import Registry

    client, work, v = served
    v3 = write_tiny_onnx_bundle(work / "bundles" / "v3", LABELS[::-1], False)
    registry = Registry.at(work / "registry")
    registry.add(work / "bundles" / "v3", v3)
    (work / "registry" / v3 / "labels.json").write_text(json.dumps(LABELS))  # tampered after upload
    registry.record("candidate", v3, "a broken challenger")
    deadline = time.monotonic() + 3.0  # well past a few pointer polls and failed loads
    while time.monotonic() < deadline:
        r = client.post("/v1/predict", json={"texts": TEXTS})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == v["v1"]
    seen = set(shadow_rows(work))
    predict_ids(client, TEXTS)
    time.sleep(1.0)
    assert {r["challenger_version"] for r in shadow_rows(work).values()} == {v["v2"]}  # v3 never scored
    assert set(shadow_rows(work)) == seen  # and v2, no longer the candidate, stopped
    assert client.get("/readyz").status_code == 200
