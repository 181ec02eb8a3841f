"""DVC's queue route for sweeps: `dvc exp run -S ... --queue` twice, then `dvc queue start`, in a real repo."""

from __future__ import annotations

import json
import time

import pytest

from intentops.data.sources import MIRROR_ENV
from support import fixture_overrides, make_project, run

# On top of the fixture's shrunk config: 2 epochs are enough to tell two learning rates apart.
TINY = ["model.max_epochs=2", "model.batch_size=32"]
LRS = ("0.001", "0.03")


def queue_idle(repo, env) -> bool:
    """True once `dvc queue status` lists no queued or running task."""
    status = run(["dvc", "queue", "status"], repo, env).stdout
    return not any(word in status for word in ("Queued", "Running"))


# ~2 min on 2 cores (a baseline repro, then two queued runs that each clone the repo and train).
@pytest.mark.slow
def test_queued_experiments_run_and_record_metrics(tmp_path, mirror):
    mirror_dir, shas = mirror
    overrides = fixture_overrides(shas, TINY)
    repo = make_project(tmp_path / "repo", overrides)
    env = {MIRROR_ENV: str(mirror_dir), "WANDB_MODE": "disabled"}
    # The baseline run, committed as a user would: queued experiments start from this commit and restore the
    # unchanged stages (data, embeddings) from the shared cache instead of running them again.
    run(["dvc", "repro", "train"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "baseline"], repo)

    # With DVC's Hydra composition each -S set is composed from conf/, so the fixture's overrides go with it.
    sets = [a for o in overrides for a in ("-S", o)]
    for lr in LRS:
        proc = run(["dvc", "exp", "run", "train", "--queue", *sets, "-S", f"model.lr={lr}"], repo, env)
        assert "Queued experiment" in proc.stdout + proc.stderr
    run(["dvc", "queue", "start"], repo, env)
    deadline = time.monotonic() + 300
    while not queue_idle(repo, env):
        assert time.monotonic() < deadline, run(["dvc", "queue", "status"], repo, env).stdout
        time.sleep(2)

    status = run(["dvc", "queue", "status"], repo, env).stdout
    assert status.count("Success") == len(LRS), status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    results = {}
    for exp in experiments:
        data = exp["revs"][0]["data"]
        lr = data["params"]["params.yaml"]["data"]["model"]["lr"]
        metrics = data["metrics"]["reports/train/metrics.json"]["data"]
        results[str(lr)] = metrics
    assert set(results) == {str(float(lr)) for lr in LRS}, results.keys()
    for metrics in results.values():
        assert metrics["model"] == "minilm_head"
        assert 0 < metrics["test"]["accuracy"] <= 1 and metrics["epochs_run"] >= 1
    # Different learning rates, different models: the two runs really trained with their own params.
    assert results[str(float(LRS[0]))]["val"]["loss"] != results[str(float(LRS[1]))]["val"]["loss"]
