"""The commands the GitHub workflows run, run here too: the promotion-gate summary step of retrain.yml, and the
reviewed labels' trip from the review-queue store (a throwaway PostgreSQL) through the DVC remote into CI."""

import json
import os
import random
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from test_store import postgres_url  # noqa: F401 (the fixture: a PostgreSQL server in a temp dir)

from support import ROOT, make_project, run


@pytest.mark.parametrize(
    "gate, promoted",
    [
        ({"promoted": True, "reasons": ["macro-F1 diff +0.0040"], "target": "candidate"}, "true"),
        (
            {"promoted": False, "reasons": ["largest per-intent F1 drop 0.12 (card_arrival) > δ (0.05)"]},
            "false",
        ),
        (None, "false"),  # the promote stage did not run
    ],
)
def test_make_gate_status_writes_output_and_summary(tmp_path, gate, promoted):
    gate_file = tmp_path / "gate.json"
    if gate is not None:
        gate_file.write_text(json.dumps(gate))
    out, summary = tmp_path / "out", tmp_path / "summary.md"
    proc = run(
        ["make", "-s", "gate-status", f"GATE={gate_file}"],
        ROOT,
        {"GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(summary)},
    )
    target = (gate or {}).get("target", "")
    assert out.read_text() == f"promoted={promoted}\ntarget={target}\n"
    text = summary.read_text()
    assert (
        "## Promotion gate: promoted" if promoted == "true" else "## Promotion gate: not promoted"
    ) in text
    assert (json.dumps(gate["reasons"][0])[1:-1] if gate else "not found") in text
    assert "gate:" in proc.stdout


RETRAIN_YML = ROOT / ".github" / "workflows" / "retrain.yml"
LABELS = ["card_arrival", "pin_blocked", "top_up_failed"]
MIN_NEW = 4


def workflow_step(name: str) -> dict:
    """A step of retrain.yml by name: its `run:` script is what the tests below execute, verbatim."""
    (step,) = [
        s
        for s in yaml.safe_load(RETRAIN_YML.read_text())["jobs"]["retrain"]["steps"]
        if s.get("name") == name
    ]
    return step


def run_step(name: str, checkout: Path, env: dict[str, str]):
    """Run a step's `run:` script as GitHub's runner does (`bash --noprofile --norc -eo pipefail`)."""
    script = workflow_step(name)["run"]
    return run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], checkout, env, check=False)


@pytest.fixture
def github() -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP server that answers the dispatches endpoint like GitHub (204), recording each body."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def fresh_database(url: str) -> str:
    name = f"labels_{os.getpid()}_{random.randrange(10**9)}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.replace("/postgres?", f"/{name}?")


def review(db_url: str, n: int, start: int = 0) -> None:
    """Queue n items and give each one annotator's label (min_annotators=1 in the project: each resolves)."""
    from intentops.feedback import store

    engine = store.make_engine(db_url)
    try:
        store.upgrade(engine)
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        ids = [f"p{i}" for i in range(start, start + n)]
        store.enqueue(
            engine,
            [
                {
                    "prediction_id": pid,
                    "text": f"customer message {pid}, card, pin or top-up",
                    "model_version": "v1",
                    "suggested_intent": LABELS[0],
                    "top_k": [{"intent": LABELS[0], "score": 0.4}],
                    "confidence": 0.4,
                    "reason": "low_confidence",
                    "created_at": t0 + timedelta(minutes=i),
                }
                for i, pid in enumerate(ids)
            ],
        )
        for i, pid in enumerate(ids):
            store.add_annotation(engine, pid, "ann", LABELS[i % len(LABELS)])
    finally:
        engine.dispose()


def checkout(origin: Path, dest: Path) -> Path:
    """What actions/checkout + `make venv` leave: a clone of HEAD (no DVC cache, no labels.csv) with .venv."""
    run(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def ci_receive(repo: Path, remote: Path, labels_payload: object, tmp: Path) -> tuple:
    """retrain.yml's steps on a repository_dispatch, up to the labels step: (its process, outputs, summary)."""
    assert (
        run_step("Point DVC at the remote from secrets", repo, {"DVC_REMOTE_URL": str(remote)}).returncode
        == 0
    )
    pulled = run_step("Pull data and models", repo, {})
    assert pulled.returncode == 0, pulled.stderr
    tmp.mkdir()
    out, summary = tmp / "github_output", tmp / "summary.md"
    env = {
        "LABELS_POINTER": json.dumps(labels_payload, indent=2),  # toJSON() pretty-prints too
        "GITHUB_OUTPUT": str(out),
        "GITHUB_STEP_SUMMARY": str(summary),
        "INTENTOPS_DB_URL": "",  # CI has no database: the step must not need one
    }
    step = workflow_step("Receive the reviewed labels")
    assert set(step["env"]) == {
        "LABELS_POINTER",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
    }
    proc = run_step("Receive the reviewed labels", repo, env)
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines()) if out.exists() else {}
    return proc, outputs, summary.read_text() if summary.exists() else ""


def test_reviewed_labels_go_from_the_store_through_the_dvc_remote_into_ci(
    tmp_path,
    postgres_url,  # noqa: F811 (the imported fixture)
    github,
    monkeypatch,
):
    """publish + dispatch where the database lives; in a clean checkout, retrain.yml's own steps pull exactly
    what was exported; a second dispatch of labels main already has ends early, green, and says so."""
    from intentops.config import PARAMS_ENV, load_params
    from intentops.feedback.publish import TooFewLabels
    from intentops.monitor.drift import dispatch_drift

    drift_side = make_project(
        tmp_path / "drift-side",
        [
            f"monitor.retrain.min_new_labels={MIN_NEW}",
            "feedback.label.min_annotators=1",
        ],
    )
    params = load_params(drift_side / "params.yaml")
    taxonomy = drift_side / params.paths.taxonomy
    taxonomy.parent.mkdir(parents=True, exist_ok=True)
    taxonomy.write_text(json.dumps({"labels": LABELS, "oos_label": None, "source": "test"}))
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "--local", "--default", "storage", str(remote)], drift_side)
    db_url, (api_url, received) = fresh_database(postgres_url), github
    review(db_url, MIN_NEW + 2)
    for key, value in {
        "INTENTOPS_DB_URL": db_url,
        "GITHUB_API_URL": api_url,
        "GITHUB_TOKEN": "ghp_test-token-not-real",
        "GITHUB_REPOSITORY": "acme/intentops",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    monkeypatch.chdir(drift_side)
    report = {"drifted_features": ["length_chars"], "rows": {"current": 300}, "windows": ["w/0001.bin"]}

    dispatch_drift(report, params)

    (body,) = received
    sent = body["client_payload"]["labels"]
    exported = (drift_side / params.paths.feedback_labels).read_bytes()
    pointer = yaml.safe_load((drift_side / f"{params.paths.feedback_labels}.dvc").read_text())["outs"][0]
    assert sent == {
        "md5": pointer["md5"],
        "size": pointer["size"],
        "new_labels": MIN_NEW + 2,
        "rows": MIN_NEW + 2,
    }
    assert pointer["size"] == len(exported) and exported.count(b"\n") == MIN_NEW + 3  # header + rows
    assert len(body["client_payload"]) <= 10 and b"customer message" not in json.dumps(body).encode()
    assert any(remote.rglob("*")), "publish pushed nothing to the DVC remote"
    with pytest.raises(TooFewLabels):  # nothing new since: exit 11, and no second dispatch
        dispatch_drift(dict(report), params)
    assert len(received) == 1
    monkeypatch.delenv("INTENTOPS_DB_URL")

    ci = checkout(drift_side, tmp_path / "ci")
    assert not (ci / params.paths.feedback_labels).exists()
    proc, outputs, summary = ci_receive(ci, remote, sent, tmp_path / "run1")
    assert proc.returncode == 0, proc.stderr
    assert (ci / params.paths.feedback_labels).read_bytes() == exported
    assert outputs == {"retrain": "true", "new_labels": str(MIN_NEW + 2)}
    assert f"## Reviewed labels: {MIN_NEW + 2} new" in summary and "Retraining" in summary
    # What create-pull-request could commit: the pointer changed; the CSV is git-ignored (.venv is our link).
    changed = run(["git", "status", "--porcelain", "--untracked-files=all"], ci).stdout.splitlines()
    assert [line for line in changed if line != "?? .venv"] == [f" M {params.paths.feedback_labels}.dvc"]

    # The retrain's pull request merged: main's pointer names these labels. A repeated dispatch of the same
    # pointer has nothing new for CI: the run stops after the labels step, green.
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qam", "retrain"], drift_side)
    ci2 = checkout(drift_side, tmp_path / "ci2")
    proc, outputs, summary = ci_receive(ci2, remote, sent, tmp_path / "run2")
    assert proc.returncode == 0, proc.stderr
    assert outputs == {"retrain": "false", "new_labels": "0"}
    assert f"Too few new reviewed labels (0 < {MIN_NEW}): not retraining" in summary


@pytest.mark.parametrize(
    "payload, complaint",
    [
        (None, "needs md5"),  # a dispatch from an older drift side: no labels pointer
        ({"md5": "0" * 31 + "Z", "size": 10}, "32 lowercase hex"),
        ({"md5": "$(touch /tmp/pwned)", "size": 10}, "32 lowercase hex"),
        ({"md5": "0" * 32, "size": "10"}, "an integer"),
    ],
)
def test_a_malformed_labels_pointer_fails_the_step_clearly(tmp_path, payload, complaint):
    from intentops.config import compose
    from intentops.errors import UserError
    from intentops.feedback.publish import receive

    params = compose([], config_dir=ROOT / "conf")
    with pytest.raises(UserError) as err:
        receive(params, json.dumps(payload), tmp_path)
    assert complaint in str(err.value) and "LABELS_POINTER" in err.value.where
    assert not any(tmp_path.iterdir()), "a refused pointer must change nothing"


def test_make_run_restores_the_labels_a_fresh_clone_lacks(tmp_path):
    """`intentops labels restore` (make run's first step): the header-only file main's pointer names needs no
    remote; labels that are neither cached nor reachable fail clearly, naming the remote to configure."""
    from intentops.feedback.label import EXPORT_COLUMNS

    labels = "data/feedback/labels.csv"
    (tmp_path / "data" / "feedback").mkdir(parents=True)
    (tmp_path / f"{labels}.dvc").write_bytes((ROOT / f"{labels}.dvc").read_bytes())
    (tmp_path / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    run(["dvc", "init", "--no-scm", "-q"], tmp_path)
    assert "header-only" in run(["intentops", "labels", "restore"], tmp_path).stdout
    assert (tmp_path / labels).read_text() == ",".join(EXPORT_COLUMNS) + "\n"

    (tmp_path / labels).unlink()
    pointer = (tmp_path / f"{labels}.dvc").read_text()
    md5 = yaml.safe_load(pointer)["outs"][0]["md5"]
    (tmp_path / f"{labels}.dvc").write_text(pointer.replace(md5, "0123456789abcdef" * 2))
    proc = run(["intentops", "labels", "restore"], tmp_path, check=False)
    assert proc.returncode == 2 and not (tmp_path / labels).exists()
    assert "no DVC remote is configured" in proc.stderr and "dvc remote add" in proc.stderr


def test_a_scratch_project_from_a_fresh_clone_restores_and_tracks_the_labels(tmp_path):
    """CI's `make test` runs in a fresh clone (no labels.csv, no remote): scratch projects still get the
    header-only file, `dvc add`-ed, and git in the project holds the pointer, never the CSV."""
    from intentops.feedback.label import EXPORT_COLUMNS
    from intentops.scratch import create_project

    clone = tmp_path / "clone"  # what a clone has of the pipeline's inputs: conf/, dvc.yaml, the pointer
    for item in (
        "conf",
        "dvc.yaml",
        ".gitignore",
        ".dvc/config",
        "data/feedback/labels.csv.dvc",
        "data/feedback/.gitignore",
    ):
        src, dst = ROOT / item, clone / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    project = create_project(tmp_path / "project", root=clone)
    labels = project / "data/feedback/labels.csv"
    assert labels.read_text() == ",".join(EXPORT_COLUMNS) + "\n"
    tracked = run(["git", "ls-files", "data/feedback"], project).stdout.split()
    assert tracked == ["data/feedback/.gitignore", "data/feedback/labels.csv.dvc"]
    assert "up to date" in run(["dvc", "status", "data/feedback/labels.csv.dvc"], project).stdout
