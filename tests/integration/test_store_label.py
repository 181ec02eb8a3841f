"""`intentops db upgrade`, `label` (two annotators, then adjudication), `label export` and `queue prune`,
each run as the real command with answers piped on stdin, against a real SQLite store."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from sklearn.metrics import cohen_kappa_score

from intentops.config import compose
from intentops.feedback import store
from support import ROOT

LABELS = ["card_arrival", "card_delivery_estimate", "lost_or_stolen_card", "pin_blocked", "top_up_failed"]
TEXTS = {
    "p1": "my card still hasn't come",
    "p2": "where is my card",
    "p3": "it doesn't work",
    "p4": "can I keep bitcoin in the app",
    "p5": "my PIN is locked",
    "p6": "top up failed again",
}


def intentops(*args: str, stdin: str = "", cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "intentops"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},  # no INTENTOPS_DB_URL: the SQLite file in params
    )


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, object]:
    params = compose(["feedback.label.min_annotators=2"], config_dir=ROOT / "conf")
    OmegaConf.save(params, tmp_path / "params.yaml")
    taxonomy = tmp_path / params.paths.taxonomy
    taxonomy.parent.mkdir(parents=True)
    taxonomy.write_text(json.dumps({"labels": LABELS, "oos_label": None, "source": "test"}))
    return tmp_path, params


def test_two_annotators_adjudication_kappa_and_export(project):
    cwd, params = project
    proc = intentops("label", "--annotator", "ann", cwd=cwd)
    assert proc.returncode == 2 and "intentops db upgrade" in proc.stderr  # no implicit schema

    assert intentops("db", "upgrade", cwd=cwd).returncode == 0
    engine = store.make_engine(f"sqlite:///{cwd / params.paths.feedback_db}")
    top_k = [{"intent": "card_arrival", "score": 0.45}, {"intent": "card_delivery_estimate", "score": 0.40}]
    store.enqueue(
        engine,
        [
            {
                "prediction_id": pid,
                "text": text,
                "model_version": "v1",
                "suggested_intent": "card_arrival",
                "top_k": top_k,
                "confidence": 0.45,
                "reason": "low_confidence",
                "created_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i),
            }
            for i, (pid, text) in enumerate(TEXTS.items())
        ],
    )

    ann = intentops(
        "label",
        "--annotator",
        "ann",
        cwd=cwd,
        stdin="\n".join(
            [
                "1",  # p1: the first suggestion, card_arrival
                "2",  # p2: card_delivery_estimate
                "unclear # no context",  # p3
                "new:crypto_wallet # crypto",  # p4: a proposed intent
                "skip",  # p5
                "not_a_label",  # p6: refused, asked again
                "top_up_failed",
            ]
        )
        + "\n",
    )
    assert ann.returncode == 0, ann.stderr
    assert "where is my card" in ann.stdout and "1. card_arrival 0.45" in ann.stdout
    assert "'not_a_label' is not in the taxonomy" in ann.stdout
    assert "ann: 5 labelled, 1 skipped of 6 shown" in ann.stdout

    bob = intentops(
        "label",
        "--annotator",
        "bob",
        cwd=cwd,
        stdin="\n".join(
            [
                "card_arrival",
                "lost_or_stolen_card",
                "pin_blocked",
                "new:crypto_wallet",
                "pin_blocked",
                "top_up_failed",
            ]
        )
        + "\n",
    )
    assert bob.returncode == 0, bob.stderr
    assert "ann" not in bob.stdout.split("kappa")[0]  # labels are independent: bob never sees ann's
    kappa = cohen_kappa_score(
        ["card_arrival", "card_delivery_estimate", "unclear", "new:crypto_wallet", "top_up_failed"],
        ["card_arrival", "lost_or_stolen_card", "pin_blocked", "new:crypto_wallet", "top_up_failed"],
    )
    assert f"kappa ann vs bob: {kappa:.3f} over 5 item(s)" in bob.stdout

    # p2 (1-1) and p3 (unclear) need adjudication; a decision without a reason is refused.
    lead = intentops(
        "label",
        "--adjudicate",
        "--annotator",
        "lead",
        cwd=cwd,
        stdin="\n".join(
            [
                "card_arrival",
                "card_arrival # says it has not come: rule 5",
                "pin_blocked # PIN locked after attempts: rule 4",
            ]
        )
        + "\n",
    )
    assert lead.returncode == 0, lead.stderr
    assert "needs a one-line reason" in lead.stdout
    assert "ann: card_delivery_estimate" in lead.stdout and "bob: lost_or_stolen_card" in lead.stdout
    assert "lead: 2 labelled" in lead.stdout
    again = intentops("label", "--adjudicate", "--annotator", "lead", cwd=cwd)
    assert "nothing to adjudicate" in again.stdout

    export = intentops("label", "export", cwd=cwd)
    assert export.returncode == 0, export.stderr
    with open(cwd / params.paths.feedback_labels, newline="") as f:
        rows = {r["prediction_id"]: r for r in csv.DictReader(f)}
    assert {p: (r["text"], r["label"], r["method"]) for p, r in rows.items()} == {
        "p1": (TEXTS["p1"], "card_arrival", "majority"),
        "p2": (TEXTS["p2"], "card_arrival", "adjudicated"),
        "p3": (TEXTS["p3"], "pin_blocked", "adjudicated"),
        "p4": (TEXTS["p4"], "new:crypto_wallet", "majority"),  # a proposed intent: ingest adds it
        "p6": (TEXTS["p6"], "top_up_failed", "majority"),
    }
    assert json.loads(rows["p2"]["votes"]) == {"ann": "card_delivery_estimate", "bob": "lost_or_stolen_card"}
    assert rows["p2"]["adjudicator"] == "lead" and rows["p1"]["guideline_version"] == "1"
    report = json.loads((cwd / params.paths.feedback_agreement).read_text())
    assert report["status"] == {"exported": 5, "proposals": 1, "pending": 1}
    assert report["mean_kappa"] == pytest.approx(kappa)

    prune = intentops("queue", "prune", "--days", "0", cwd=cwd)  # everything is older than now
    assert prune.returncode == 0, prune.stderr
    assert "6 review_queue" in prune.stdout and store.queue_items(engine) == []
    engine.dispose()
