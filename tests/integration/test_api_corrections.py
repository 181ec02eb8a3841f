"""API corrections as labelling votes, end to end: the real Serve app, two API-key clients, `label export`, ingest's
reader; per-client feedback ids, the text opt-in, the audit sample, labelled accuracy, and the v2 -> v3 upgrade on
SQLite and a throwaway PostgreSQL.

One Ray + Serve instance for the module. The bundle is the near-uniform tiny ONNX bundle: with the default review
thresholds every text needs review (its text is queued); with thresholds 0 none does.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pytest
import sqlalchemy as sa
from test_store import engine, postgres_url  # noqa: F401  (fixtures: an empty SQLite / PostgreSQL database)

from intentops.config import compose
from intentops.errors import UserError
from intentops.feedback import audit, ledger, store
from intentops.feedback.label import main_export
from support import ROOT, deploy_intent_service, new_store, serve_on_loopback, write_tiny_onnx_bundle

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked"]
KEYS = {"alice": "key-of-alice", "bob": "key-of-bob"}
ALICE, BOB = ({"X-API-Key": KEYS[n]} for n in ("alice", "bob"))


def project_params(work: Path, db: Path, *overrides: str):
    """Composed params whose store, labels and taxonomy live under `work` (as `label export` reads them)."""
    params = compose(
        [
            f"paths.feedback_db={db}",
            f"paths.feedback_labels={work / 'labels.csv'}",
            f"paths.feedback_agreement={work / 'agreement.json'}",
            f"paths.taxonomy={work / 'taxonomy.json'}",
            *overrides,
        ],
        config_dir=ROOT / "conf",
    )
    (work / "taxonomy.json").write_text(json.dumps({"labels": LABELS, "oos_label": None, "source": "test"}))
    return params


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, work dir, deploy(user_config overrides)) of the app with two named keys and one plain key."""
    work = tmp_path_factory.mktemp("corrections")
    write_tiny_onnx_bundle(work / "bundle", LABELS, confident=False)
    db = new_store(work / "queue.db")
    base_config = {
        "bundle": str(work / "bundle"),
        "watch_interval_s": 0,
        "max_text_chars": 200,
        "store": {"record_predictions": True, "db": str(db), "flush_s": 0.05},
        "monitoring": {"enabled": False},
    }
    keys = {"INTENTOPS_API_KEY": f"alice={KEYS['alice']}, bob={KEYS['bob']}, plain-old-key"}

    def deploy(**overrides) -> None:  # a changed user_config is applied in place (reconfigure)
        deploy_intent_service({**base_config, **overrides}, env=keys)

    with serve_on_loopback() as url:
        deploy()
        yield url, work, deploy


def predict_ids(client, texts: list[str], headers=ALICE) -> list[dict]:
    r = client.post("/v1/predict", json={"texts": texts}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def correct(client, headers, pid: str, label: str, **extra) -> httpx.Response:
    """POST /v1/feedback; a 503 (the prediction still buffered) is retried as the API asks."""
    for _ in range(50):
        r = client.post("/v1/feedback", json={"prediction_id": pid, "label": label, **extra}, headers=headers)
        if r.status_code != 503:
            return r
        time.sleep(0.1)
    return r


@pytest.mark.slow  # one Serve instance for the three: ~65 s
def test_two_clients_corrections_are_votes_exported_and_ingested(client, served):
    from intentops.data.readers import read_feedback

    _, work, _ = served
    texts = ["my card never came", "someone took my wallet", "what rate for euros", "pin locked out"]
    preds = predict_ids(client, texts)
    assert all(p["needs_review"] for p in preds)  # the near-uniform bundle: every text is queued
    p = [x["prediction_id"] for x in preds]
    # alice and bob agree on p0; they disagree on p1; only bob corrects p2; alice changes her mind on p3
    answers = [
        correct(client, ALICE, p[0], "card_arrival", annotator="agent-7", feedback_id="1"),
        correct(client, BOB, p[0], "card_arrival", feedback_id="1"),  # same id as alice: both stored
        correct(client, ALICE, p[1], "lost_or_stolen_card"),
        correct(client, BOB, p[1], "card_arrival"),
        correct(client, BOB, p[2], "exchange_rate", feedback_id="b-2"),
        correct(client, ALICE, p[3], "card_arrival", feedback_id="a-3"),
        correct(client, ALICE, p[3], "pin_blocked", feedback_id="a-4"),  # a new id: her latest is her vote
    ]
    assert [(r.status_code, r.json()["stored"], r.json()["vote"]) for r in answers] == [(201, True, True)] * 7
    assert [r.json()["client"] for r in answers[:2]] == ["alice", "bob"]  # from the key, not `annotator`

    retry = correct(client, BOB, p[0], "card_arrival", feedback_id="1")
    assert (retry.status_code, retry.json()["stored"]) == (201, False)
    conflict = correct(client, BOB, p[0], "pin_blocked", feedback_id="1")
    assert conflict.status_code == 409
    assert "'card_arrival'" in conflict.json()["error"] and "new feedback_id" in conflict.json()["fix"]

    params = project_params(work, work / "queue.db")
    result = main_export(params)
    table = pd.read_csv(work / "labels.csv", dtype=str, keep_default_na=False).set_index("prediction_id")
    assert table.loc[p[0], ["text", "label", "method"]].tolist() == [texts[0], "card_arrival", "api"]
    assert json.loads(table.loc[p[0], "votes"]) == {"api:alice": "card_arrival", "api:bob": "card_arrival"}
    assert table.loc[p[2], ["label", "method"]].tolist() == ["exchange_rate", "api"]
    assert json.loads(table.loc[p[3], "votes"]) == {"api:alice": "pin_blocked"}
    assert p[1] not in table.index and result["status"]["needs_adjudication"] >= 1  # alice vs bob
    frame, proposed = read_feedback((work / "labels.csv").read_bytes(), "labels.csv")  # ingest's reader
    assert set(frame["text"]) >= {texts[0], texts[2], texts[3]} and proposed == []
    counts = audit.api_corrections(params)
    assert counts["exported"] == 4 and counts["exported_rows"] == 3 and counts["clients"] == 2


@pytest.mark.slow  # one Serve instance for the three: ~65 s
def test_a_plain_key_and_an_unknown_prediction(client):
    (pred,) = predict_ids(client, ["card gone"])
    r = correct(client, {"X-API-Key": "plain-old-key"}, pred["prediction_id"], "card_arrival")
    assert (
        r.status_code == 201 and r.json()["client"].startswith("key-") and "plain" not in r.json()["client"]
    )
    r = correct(client, ALICE, str(uuid.uuid4()), "card_arrival")
    assert r.status_code == 404 and "prediction_id" in r.json()["where"]


@pytest.mark.slow  # one Serve instance for the three: ~65 s
def test_text_opt_in(client, served):
    _, work, deploy = served
    (pred,) = predict_ids(client, ["card gone again"])
    r = correct(client, ALICE, pred["prediction_id"], "card_arrival", text="card gone again")
    assert r.status_code == 422 and "accept_text" in r.json()["where"]

    deploy(feedback={"accept_text": True}, review={"min_confidence": 0.0, "min_margin": 0.0})
    (pred,) = predict_ids(client, ["the top up bounced"])
    assert pred["needs_review"] is False  # thresholds 0: not queued
    pid = pred["prediction_id"]
    assert correct(client, ALICE, pid, "top_up_failed", text="x" * 201).status_code == 413
    r = correct(client, ALICE, pid, "top_up_failed", text="the top up bounced")
    assert r.status_code == 201 and r.json()["text_queued"] and r.json()["vote"]
    params = project_params(work, work / "queue.db")
    eng = store.engine_from_params(params)
    queued = {i["prediction_id"]: i for i in store.queue_items(eng)}
    eng.dispose()
    assert queued[pid]["reason"] == "correction" and queued[pid]["text"] == "the top up bounced"
    main_export(params)
    table = pd.read_csv(work / "labels.csv", dtype=str, keep_default_na=False).set_index("prediction_id")
    assert table.loc[pid, ["text", "label", "method"]].tolist() == [
        "the top up bounced",
        "top_up_failed",
        "api",
    ]


# --- the store alone (SQLite and PostgreSQL) -------------------------------------------------------------------


def api_rows(n: int, needs_review: bool = False) -> list[dict]:
    return [
        {
            "prediction_id": str(uuid.uuid4()),
            "intent": "card_arrival",
            "confidence": 0.95,
            "top_k": [{"intent": "card_arrival", "confidence": 0.95}],
            "out_of_scope": False,  # low confidence is reviewed, not out of scope
            "reason": "low_confidence" if needs_review else None,
            "needs_review": needs_review,
            "model_version": "m1",
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_audit_share_queues_all_or_none(engine, share):  # noqa: F811
    store.upgrade(engine)
    calm, flagged = api_rows(20), api_rows(2, needs_review=True)
    ledger.record_calls(
        engine, [([f"t{i}" for i in range(20)], calm), (["f0", "f1"], flagged)], audit_share=share
    )
    queued = {i["prediction_id"]: i for i in store.queue_items(engine)}
    assert {r["prediction_id"] for r in flagged} <= queued.keys()
    assert all(queued[r["prediction_id"]]["reason"] == "low_confidence" for r in flagged)  # keeps its reason
    audited = [q for q in queued.values() if q["reason"] == "audit"]
    assert len(audited) == (20 if share else 0)
    assert sum(bool(q["audit"]) for q in queued.values()) == (22 if share else 0)


def test_per_client_feedback_ids(engine):  # noqa: F811
    store.upgrade(engine)
    assert store.add_feedback(engine, "p1", "card_arrival", "alice", feedback_id="1") is True
    assert store.add_feedback(engine, "p2", "pin_blocked", "bob", feedback_id="1") is True
    assert store.add_feedback(engine, "p1", "card_arrival", "alice", feedback_id="1") is False
    with pytest.raises(store.FeedbackConflict) as err:
        store.add_feedback(engine, "p1", "pin_blocked", "alice", feedback_id="1")
    assert err.value.stored["label"] == "card_arrival"
    store.add_feedback(engine, "p1", "pin_blocked", "alice", feedback_id="2")  # replaces her vote
    latest = {(r["client"], r["prediction_id"]): r["label"] for r in store.latest_corrections(engine)}
    assert latest == {("alice", "p1"): "pin_blocked", ("bob", "p2"): "pin_blocked"}


def test_upgrade_from_v2_keeps_the_feedback(engine):  # noqa: F811
    assert store.upgrade(engine, target=2) == (0, 2)
    when = datetime(2024, 5, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO feedback (feedback_id, prediction_id, label, annotator, created_at) "
                "VALUES ('1', 'p1', 'card_arrival', 'agent-7', :t), ('2', 'p2', 'pin_blocked', 'x', :t)"
            ),
            {"t": when},
        )
    store.enqueue(engine, [ledger.correction_item(_served("p1"), "my card")])
    assert store.upgrade(engine) == (2, store.SCHEMA_VERSION)
    store.check_schema(engine)
    rows = store.table_rows(engine, store.feedback)
    assert [(r["client"], r["feedback_id"], r["annotator"]) for r in rows] == [
        ("anonymous", "1", "agent-7"),
        ("anonymous", "2", "x"),
    ]
    assert store.queue_items(engine)[0]["audit"] in (False, 0)
    # the id "1" is now free for every other client, and the migrated rows' own key still holds
    assert store.add_feedback(engine, "p9", "card_arrival", "alice", feedback_id="1") is True
    assert store.add_feedback(engine, "p1", "card_arrival", "anonymous", feedback_id="1") is False
    assert store.prune(engine, 0, now=datetime.now(UTC) + timedelta(days=1))["feedback"] == 3


def _served(pid: str) -> dict:
    return {"prediction_id": pid, "model_version": "m1", "intent": "card_arrival", "confidence": 0.5}


def upgraded_store(tmp_path):
    """(params of a project whose store is an upgraded SQLite file, its engine, a fixed start time)."""
    params = project_params(tmp_path, tmp_path / "queue.db")
    eng = store.engine_from_params(params)
    store.upgrade(eng)
    return params, eng, datetime(2024, 6, 1, tzinfo=UTC)


def test_labelled_accuracy_per_window(tmp_path):
    params, eng, t0 = upgraded_store(tmp_path)
    items = []
    for i, served_intent in enumerate(["card_arrival", "card_arrival", "pin_blocked"]):
        items.append(
            {
                **ledger.correction_item({**_served(f"a{i}"), "intent": served_intent}, f"text {i}"),
                "reason": "audit",
                "audit": True,
                "created_at": t0 + timedelta(hours=i),
            }
        )
    store.enqueue(eng, items)
    store.enqueue(eng, [{**ledger.correction_item(_served("n0"), "not audited"), "created_at": t0}])
    for i, truth in enumerate(["card_arrival", "pin_blocked", "pin_blocked"]):
        store.add_feedback(eng, f"a{i}", truth, "alice")  # one API vote resolves (api_votes.min_votes 1)
    store.add_feedback(eng, "n0", "pin_blocked", "alice")
    eng.dispose()
    first, both, empty = audit.labelled_accuracy(
        params,
        [(t0, t0 + timedelta(hours=2)), (t0, t0 + timedelta(days=1)), (t0 - timedelta(days=1), t0)],
    )
    assert (first["n"], first["correct"], first["accuracy"]) == (2, 1, 0.5)
    assert (both["n"], both["correct"]) == (3, 2) and both["low"] < 2 / 3 < both["high"]
    assert empty == {"n": 0, "correct": 0, "accuracy": None, "low": None, "high": None, "corrected_errors": 0}


def test_corrections_count_as_known_errors_of_their_window_queued_or_not(tmp_path):
    params, eng, t0 = upgraded_store(tmp_path)
    served = [("p0", "card_arrival", 0), ("p1", "card_arrival", 1), ("p2", "pin_blocked", 30)]
    with eng.begin() as conn:
        conn.execute(
            store.predictions.insert(),
            [
                {
                    "prediction_id": pid,
                    "model_version": "m-1",
                    "intent": intent,
                    "confidence": 0.9,
                    "needs_review": False,
                    "created_at": t0 + timedelta(minutes=m),
                }
                for pid, intent, m in served
            ],
        )
    store.add_feedback(eng, "p0", "pin_blocked", "alice")  # wrong: a known error
    store.add_feedback(eng, "p0", "pin_blocked", "bob")  # the same error, counted once
    store.add_feedback(eng, "p1", "card_arrival", "alice")  # a confirmation, not an error
    store.add_feedback(eng, "p2", "card_arrival", "anonymous")  # not counted (api_votes.anonymous: false)
    eng.dispose()
    first, second = audit.labelled_accuracy(
        params, [(t0, t0 + timedelta(minutes=10)), (t0 + timedelta(minutes=10), t0 + timedelta(hours=1))]
    )
    assert (first["corrected_errors"], second["corrected_errors"]) == (1, 0)


def test_labelled_accuracy_names_an_unreachable_store(tmp_path):
    params = project_params(tmp_path, tmp_path / "missing" / "queue.db")
    with pytest.raises(UserError) as err:
        audit.labelled_accuracy(params, [(datetime.now(UTC), datetime.now(UTC))])
    assert str(tmp_path) in err.value.where and "upgrade" in err.value.fix
