"""The OpenAPI document of the real Ray Serve app is a contract: schemathesis, all checks, finds nothing.

One Ray + Serve instance for the module, serving two apps: `api` (a tiny sealed ONNX bundle with a model card,
behind a route prefix, API key required, predictions recorded) and `plain` (a bundle without a model card).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import deploy_intent_service, new_store, serve_on_loopback, write_tiny_onnx_bundle

pytestmark = pytest.mark.slow  # Ray, two Serve apps and ~800 schemathesis cases: ~50 s

KEY = "contract-key-1"
AUTH = {"X-API-Key": KEY}
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked"]
CARD_MD = "# Model card\n\nIntended use: routing the fixture's five banking intents.\n"
# What the test may take of the run: a case is a few ms, but Ray, the replicas and hypothesis add up.
ST_TIMEOUT_S = 240
# negative_data_rejection's defaults plus 413: a text over maxLength (max_text_chars) or more texts than
# maxItems (max_texts) is refused with 413 Payload Too Large, as documented, which is a rejection too.
ST_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""


def tiny_bundle(dest: Path, model_card: str | None) -> Path:
    """A sealed tiny ONNX bundle whose card names its dataset; with `model_card` written as model_card.md."""
    from intentops.inference.bundle import MODEL_CARD_FILE, seal

    card = {"params": {"data": {"name": "fixture77"}}}
    write_tiny_onnx_bundle(dest, LABELS, True, card=card)
    if model_card is not None:
        (dest / MODEL_CARD_FILE).write_text(model_card, encoding="utf-8")
        seal(dest)  # a file added on purpose: the manifest must list it
    return dest


def app_config(bundle: Path, work: Path) -> dict:
    db = work / f"{bundle.name}.db"
    return {
        "bundle": str(bundle),
        "watch_interval_s": 0,
        "max_texts": 8,
        "max_text_chars": 200,
        "max_body_bytes": 20000,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
        "store": {"record_predictions": True, "db": str(db)},
        "monitoring": {"enabled": False},
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(origin url, work dir) of Serve running `api` at /api (with a model card) and `plain` at /plain."""
    work = tmp_path_factory.mktemp("contract")
    apps = {
        "api": tiny_bundle(work / "api", CARD_MD),
        "plain": tiny_bundle(work / "plain", None),
    }
    for bundle in apps.values():
        new_store(work / f"{bundle.name}.db")
    with serve_on_loopback() as url:
        for name, bundle in apps.items():
            deploy_intent_service(
                app_config(bundle, work),
                app=name,
                route_prefix=f"/{name}",
                env={"INTENTOPS_API_KEY": KEY},
                deployment=f"IntentService_{name}",
            )
        yield url, work


def test_the_document_says_what_the_server_enforces(client):
    doc = client.get("/api/openapi.json", headers=AUTH).json()
    assert doc["info"]["title"] == "intentops: fixture77 intents"
    assert "5 intents" in doc["info"]["summary"] and "Banking77" not in json.dumps(doc["info"])
    schemas = doc["components"]["schemas"]
    assert schemas["FeedbackRequest"]["properties"]["label"]["enum"] == sorted(LABELS)
    assert "text" not in schemas["FeedbackRequest"]["properties"]  # serving.feedback.accept_text is off
    predict_body = schemas["PredictRequest"]
    assert predict_body["oneOf"] == [{"required": ["text"]}, {"required": ["texts"]}]
    assert predict_body["properties"]["texts"]["maxItems"] == 8
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, codes in {
        "/v1/predict": "400 401 413 422",
        "/v1/feedback": "400 401 404 409 413 422 503",
    }.items():
        responses = doc["paths"][path]["post"]["responses"]
        for code in codes.split():
            assert responses[code]["content"]["application/json"]["schema"] == error, (path, code)
        assert "Ray Serve's own answer" in responses["408"]["description"]
        assert "not this API's error shape" in responses["503"]["description"]
    examples = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert {json.dumps(sorted(e["value"])) for e in examples.values()} == {'["text"]', '["texts"]'}
    assert schemas["PredictResponse"]["examples"][0]["predictions"][0]["needs_review"] is False


def test_bad_json_gets_the_error_shape(client):
    for body, status in ((b"{not json", 422), (b'{"text": "caf\xe9"}', 400)):
        r = client.post("/api/v1/predict", content=body, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error", "where", "fix"}, r.text


def test_the_model_card_is_served_and_linked(client):
    info = client.get("/api/v1/model", headers=AUTH).json()
    assert info["model_card"] == "/api/v1/model/card"
    r = client.get(info["model_card"], headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert r.text == CARD_MD
    assert client.get("/plain/v1/model", headers=AUTH).json()["model_card"] is None
    missing = client.get("/plain/v1/model/card", headers=AUTH)
    assert missing.status_code == 404
    body = missing.json()
    assert "no model card" in body["error"] and "export" in body["fix"]


def test_schemathesis_finds_no_failure(served, tmp_path, capsys):
    """All checks, 2 workers, a bounded number of examples per operation; the summary shows the cases run."""
    url, _ = served
    config = tmp_path / "schemathesis.toml"
    config.write_text(ST_CONFIG)
    st = Path(sys.executable).parent / "st"
    cmd = [
        str(st),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{url}/api/openapi.json",
        "--url",
        f"{url}/api",
        "--checks",
        "all",
        "--workers",
        "2",
        "--max-examples",
        "60",
        "--seed",
        "20261204",
        "--header",
        f"X-API-Key: {KEY}",
        "--request-timeout",
        "20",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ST_TIMEOUT_S, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    summary = [line for line in output.splitlines() if re.search(r"\d+ (generated|passed|failed)", line)]
    with capsys.disabled():  # the cases generated and the failures, in every run's output
        print(f"\nschemathesis ({time.monotonic() - start:.0f} s):", *summary, sep="\n  ")
    assert proc.returncode == 0, output
    generated = re.search(r"(\d+) generated", output)
    assert generated and int(generated.group(1)) > 0, output
    assert not re.search(r"[1-9]\d* (failed|errors?)\b", output), output
    with capsys.disabled():
        print(f"  schemathesis: {generated.group(1)} cases generated, 0 failures")
