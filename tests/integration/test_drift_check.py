"""`intentops drift-check` end to end: real config, real whylogs profiles, real report files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from intentops import cli
from intentops.config import PARAMS_ENV, compose
from intentops.monitor.drift import DRIFT_EXIT_CODE
from intentops.monitor.features import utterance_features
from intentops.monitor.profiles import ProfileWindowWriter, read_vocab
from support import ROOT, fixture_rows


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with params.yaml composed from the real conf/, the split, and a reference profile."""
    params = compose(["monitor.drift.min_rows=100", "monitor.drift.last_n=3"], config_dir=ROOT / "conf")
    OmegaConf.save(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    train, test = fixture_rows()
    for path, split in ((params.paths.train, train), (params.paths.val, test)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(split, columns=["text", "label"]).to_parquet(path)
    cli.main(["drift-reference"])
    assert Path(params.paths.monitoring_reference).is_file()
    return tmp_path


def paths():
    """paths.* of the params.yaml in the working directory (the `project` fixture's)."""
    from intentops.config import load_params

    return load_params().paths


def write_traffic(texts: list[str]) -> None:
    vocab = read_vocab(paths().monitoring_vocab)
    with ProfileWindowWriter(paths().monitoring_profiles, max_rows=100) as writer:
        writer.log(utterance_features(texts, vocab))


def same_distribution(n: int = 300, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    _, test = fixture_rows()
    return [rng.choice(test)[0] for _ in range(n)]


def shifted(n: int = 300, seed: int = 2) -> list[str]:
    """Long messages full of numbers and amounts: nothing like the short card questions of the reference."""
    rng = random.Random(seed)
    return [
        f"On {rng.randint(1, 28)}/{rng.randint(1, 12)} I sent ${rng.randint(10, 9999)} with reference "
        f"{rng.randint(10**7, 10**8)} to account {rng.randint(10**9, 10**10)} and it still shows nothing, "
        "please investigate this transaction urgently because the rent is due"
        for _ in range(n)
    ]


def test_same_distribution_exits_0_and_renders_reports(project, capsys):
    write_traffic(same_distribution())
    cli.main(["drift-check"])  # returns: exit status 0
    report = json.loads(Path(paths().drift_report).read_text())
    assert report["drift"] is False and report["drifted_features"] == []
    assert report["rows"]["current"] == 300 and len(report["windows"]) == 3
    assert set(report["features"]) == {
        "length_chars",
        "length_tokens",
        "oov_rate",
        "has_digits",
        "has_amount",
    }
    # No model yet: the prediction features are reported as not checked, not silently dropped.
    assert report["skipped"]["confidence"] == "not in the reference profile"
    assert Path(paths().drift_plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = Path(paths().drift_html).read_text()
    assert "no drift" in html and "length_chars" in html and "data:image/png;base64," in html
    assert "no drift" in capsys.readouterr().out


def test_shifted_traffic_exits_with_the_drift_code(project):
    write_traffic(shifted())
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "intentops"), "drift-check", "--last-n", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == DRIFT_EXIT_CODE == 10, proc.stderr
    assert "drift in" in proc.stderr and "length_chars" in proc.stderr
    report = json.loads(Path(paths().drift_report).read_text())
    assert report["drift"] is True
    assert {"length_chars", "length_tokens", "has_digits", "has_amount"} <= set(report["drifted_features"])
    assert report["rows"]["current"] == 200  # --last-n 2 of the 3 windows
    assert "DRIFT" in Path(paths().drift_html).read_text()


def test_errors_exit_2_with_a_message(project, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["drift-check"])  # no windows yet
    assert exc.value.code == 2
    assert "no closed profile windows" in capsys.readouterr().err

    write_traffic(same_distribution(50))
    with pytest.raises(SystemExit) as exc:
        cli.main(["drift-check"])
    assert exc.value.code == 2
    assert "only 50 rows" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        cli.main(["drift-check", "--reference", "missing.bin"])
    assert exc.value.code == 2
    assert "reference profile not found" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        cli.main(["drift-check", "--serve-url", "http://127.0.0.1:8000"])
    assert exc.value.code == 2
    assert "--serve-url only applies with --retrain" in capsys.readouterr().err
    assert not Path(paths().drift_report).exists()  # failed checks leave no half report


def test_retrain_without_drift_does_nothing_and_with_too_few_labels_explains(project, capsys):
    """--retrain: no drift -> exit 0, nothing run; drift but fewer new reviewed labels than configured -> exit 11."""
    from intentops.config import load_params
    from intentops.feedback import store
    from intentops.monitor.retrain import TOO_FEW_LABELS_EXIT_CODE

    write_traffic(same_distribution())
    cli.main(["drift-check", "--retrain"])  # returns: exit 0
    assert "no drift" in capsys.readouterr().out and not Path(paths().feedback_labels).exists()

    params = load_params()
    Path(params.paths.taxonomy).parent.mkdir(parents=True, exist_ok=True)
    Path(params.paths.taxonomy).write_text(
        json.dumps({"labels": sorted({lb for _, lb in fixture_rows()[0]})})
    )
    engine = store.engine_from_params(params)
    store.upgrade(engine)
    engine.dispose()
    write_traffic(shifted())
    with pytest.raises(SystemExit) as exc:
        cli.main(["drift-check", "--retrain", "--last-n", "3"])
    assert exc.value.code == TOO_FEW_LABELS_EXIT_CODE == 11
    err = capsys.readouterr().err
    assert "only 0 new reviewed label(s)" in err and "at least 50" in err and "intentops label" in err
    assert json.loads(Path(paths().drift_report).read_text())["drift"] is True
    assert not Path(paths().feedback_labels).exists()  # nothing exported, nothing retrained


def test_dispatch_on_drift_sends_the_repository_dispatch(project, monkeypatch):
    """--dispatch publishes the reviewed labels (export + dvc add, here without a remote) and posts
    `drift-detected` with their DVC pointer to the GitHub API (here a local server that answers like GitHub)."""
    from intentops.feedback import store

    params = OmegaConf.load("params.yaml")
    params.monitor.retrain.min_new_labels, params.feedback.label.min_annotators = 2, 1
    OmegaConf.save(params, "params.yaml")
    labels = sorted({lb for _, lb in fixture_rows()[0]})
    Path(params.paths.taxonomy).parent.mkdir(parents=True, exist_ok=True)
    Path(params.paths.taxonomy).write_text(json.dumps({"labels": labels}))
    engine = store.engine_from_params(params)
    store.upgrade(engine)
    store.enqueue(
        engine,
        [
            {
                "prediction_id": f"p{i}",
                "text": f"reviewed message {i}",
                "model_version": "v1",
                "suggested_intent": labels[0],
                "top_k": [],
                "confidence": 0.3,
                "reason": "low_confidence",
                "created_at": store.now_utc(),
            }
            for i in range(3)
        ],
    )
    for i in range(3):
        store.add_annotation(engine, f"p{i}", "ann", labels[i])
    engine.dispose()
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], check=True)
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_test-token-not-real")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/intentops")
    try:
        write_traffic(shifted())
        with pytest.raises(SystemExit) as exc:
            cli.main(["drift-check", "--dispatch"])
    finally:
        server.shutdown()
        server.server_close()
    assert exc.value.code == DRIFT_EXIT_CODE
    (request,) = received
    assert request["path"] == "/repos/acme/intentops/dispatches"
    assert request["body"]["event_type"] == "drift-detected"
    assert "length_chars" in request["body"]["client_payload"]["drifted_features"]
    pointer = (Path(f"{params.paths.feedback_labels}.dvc")).read_text()
    sent = request["body"]["client_payload"]["labels"]
    assert f"md5: {sent['md5']}" in pointer and f"size: {sent['size']}" in pointer
    assert sent["new_labels"] == sent["rows"] == 3


def predictions_for(
    rows: list[tuple[str, str]], seed: int, ood_share: float = 0.05, novel: float = 0.0
) -> list:
    """Predictor-shaped outputs on labelled rows: calibrated (right with probability = confidence), `ood_share`
    of in-distribution rows flagged out_of_distribution; a `novel` share of rows answered as if their intent were
    unknown to the model (wrong, lower confidence, mostly flagged)."""
    rng = random.Random(seed)
    labels = sorted({lb for _, lb in rows})
    out = []
    for _, label in rows:
        if rng.random() < novel:
            conf, reason, right = (
                rng.uniform(0.3, 0.7),
                "out_of_distribution" if rng.random() < 0.8 else None,
                False,
            )
        else:
            conf = rng.uniform(0.85, 1.0)
            reason = "out_of_distribution" if rng.random() < ood_share else None
            right = rng.random() < (0.6 if reason else conf)
        intent = label if right else rng.choice([lb for lb in labels if lb != label])
        out.append({"intent": intent, "confidence": conf, "reason": reason, "label": label})
    return out


def write_model_reference(n: int = 2000) -> None:
    """A reference profile with a model's outputs and the val statistics, as the profile stage writes them."""
    from intentops.monitor.profiles import (
        PERFORMANCE_KEY,
        put_atomic,
        reference_profile,
        url_to_fs,
        val_performance,
        with_metadata,
    )

    train, test = fixture_rows()
    rng = random.Random(0)
    val = [rng.choice(test) for _ in range(n)]
    preds = predictions_for(val, seed=1)
    _, view = reference_profile([t for t, _ in train], [t for t, _ in val], 2, preds)
    stats = val_performance(preds, [lb for _, lb in val])
    view = with_metadata(view, {PERFORMANCE_KEY: json.dumps(stats)})
    fs, root = url_to_fs(paths().monitoring_reference)
    put_atomic(fs, root, view.serialize())


def write_served(n: int, seed: int, version: str, **shift) -> None:
    """Windows of served rows (features of texts and predictions, model version and variant as serving tags them)."""
    rng = random.Random(seed)
    _, test = fixture_rows()
    rows = [rng.choice(test) for _ in range(n)]
    preds = predictions_for(rows, seed=seed, **shift)
    vocab = read_vocab(paths().monitoring_vocab)
    with ProfileWindowWriter(paths().monitoring_profiles, max_rows=1000) as writer:
        writer.log(
            utterance_features([t for t, _ in rows], vocab, preds),
            {"model_version": version, "variant": "fp32"},
        )


def drift_check(*args: str) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exc:
        cli.main(["drift-check", *args])
        raise SystemExit(0)
    return exc.value.code, json.loads(Path(paths().drift_report).read_text())


def test_estimated_accuracy_per_window_and_its_trigger(project, capsys):
    """Same traffic: exit 0 and an estimate near val's. More rows flagged out-of-distribution than val (a change
    below min_effect for the drift test): exit 13. Held-out-intent-like traffic: feature drift (exit 10) and the
    estimate drops too."""
    from intentops.monitor.drift import PERFORMANCE_EXIT_CODE

    write_model_reference()
    write_served(2000, seed=2, version="m-1")
    code, report = drift_check("--last-n", "2")
    perf = report["performance"]
    assert code == 0 and not perf["triggered"]
    ref = perf["reference"]
    assert ref["estimated_accuracy"] == pytest.approx(ref["labelled_accuracy"], abs=1e-9)
    assert abs(perf["current"]["estimated_accuracy"] - ref["estimated_accuracy"]) < 0.03
    assert [w["window"] for w in perf["windows"]] == report["windows"]
    assert all(
        w["model_version"] == "m-1" and w["variant"] == "fp32" and w["rows"] == 1000 for w in perf["windows"]
    )
    assert perf["windows"][0]["end"] <= perf["windows"][1]["start"]
    assert all(w["low"] <= w["estimated_accuracy"] <= w["high"] for w in perf["windows"])
    assert Path(paths().performance_plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Estimated accuracy" in Path(paths().drift_html).read_text()
    assert "intentops_estimated_accuracy{model_version=m-1}" in capsys.readouterr().out

    write_served(2000, seed=3, version="m-1", ood_share=0.12)
    code, report = drift_check("--last-n", "2")
    assert code == PERFORMANCE_EXIT_CODE == 13, report["features"]["review_reason"]
    assert report["drift"] is False and report["performance"]["triggered"]
    reason = report["features"]["review_reason"]
    assert (
        reason["value"] < 0.01 and reason["effect"] < reason["min_effect"]
    )  # significant, too small for drift
    assert "estimated accuracy" in capsys.readouterr().err

    write_served(2000, seed=4, version="m-1", novel=0.6)
    code, report = drift_check("--last-n", "2")
    perf = report["performance"]
    assert code == DRIFT_EXIT_CODE and {"confidence", "review_reason"} <= set(report["drifted_features"])
    assert perf["triggered"] and perf["drop"] > 0.25
