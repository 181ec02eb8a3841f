"""Hydra sweeps over `train` on the fixture project: basic launcher, Optuna sweeper, local Ray launcher."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from intentops.config import repo_root
from support import SMALL

# One thread: the Ray launcher runs trials side by side.
TINY = [*SMALL, "model.max_epochs=2", "model.batch_size=32", "train.num_threads=1"]


@pytest.fixture
def sweep_project(small_project, tmp_path):
    """The fixture project's data with a copy of the real conf/, as a working directory for `intentops.sweep`."""
    root, _ = small_project
    project = tmp_path / "project"
    shutil.copytree(root, project)
    shutil.copytree(repo_root() / "conf", project / "conf")
    return project


def run_sweep(project, args: list[str]) -> dict:
    sweep_dir = project / "multirun" / "test"
    proc = subprocess.run(
        [sys.executable, "-m", "intentops.sweep", *args, *TINY, f"hydra.sweep.dir={sweep_dir}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    for trial in summary["trials"]:
        metrics = json.loads((sweep_dir / trial["trial"] / "metrics.json").read_text())
        assert 0 <= metrics["val"]["accuracy"] <= 1 and metrics["test"]["accuracy"] > 0
    assert summary["best"]["val_accuracy"] == max(t["val_accuracy"] for t in summary["trials"])
    return summary


def test_grid_sweep_names_best_trial(sweep_project):
    summary = run_sweep(sweep_project, ["-m", "model.lr=1e-3,3e-2"])
    assert summary["n_trials"] == 2
    assert {o for t in summary["trials"] for o in t["overrides"] if o.startswith("model.lr")} == {
        "model.lr=0.001",
        "model.lr=0.03",
    }


def test_optuna_sweep(sweep_project):
    summary = run_sweep(sweep_project, ["hparams_search=optuna", "hydra.sweeper.n_trials=2"])
    assert summary["n_trials"] == 2
    assert (sweep_project / "multirun" / "test" / "optimization_results.yaml").is_file()


@pytest.mark.slow
def test_ray_launcher_sweep(sweep_project):
    summary = run_sweep(sweep_project, ["-m", "hydra/launcher=ray", "model.lr=1e-3,3e-2"])
    assert summary["n_trials"] == 2
