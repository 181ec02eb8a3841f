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
    """--dispatch posts `drift-detected` to the GitHub API (here a local server that answers like GitHub)."""
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
