"""Every stage in dvc.yaml refuses arguments it does not understand: `--help` prints its purpose and the
params.yaml keys it reads, anything else exits 2 with a hint to use `dvc exp run -S`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
ARGS = (["--help"], ["--bogus"])


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """`python -m intentops.stages.<stage> ARG` for every stage and ARG, run side by side (each imports its stage)."""

    def run(stage: str, args: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", f"intentops.stages.{stage}", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)

    jobs = [(stage, args) for stage in STAGES for args in ARGS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        done = pool.map(lambda job: run(*job), jobs)
        return {(stage, args[0]): proc for (stage, args), proc in zip(jobs, done, strict=True)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_prints_the_purpose_and_the_params_keys(runs, stage):
    proc = runs[stage, "--help"]
    assert proc.returncode == 0, proc.stderr
    source = (ROOT / "src" / "intentops" / "stages" / f"{stage}.py").read_text(encoding="utf-8")
    purpose = ast.get_docstring(ast.parse(source)).split("\n\n")[0]  # its module docstring, not imported here
    assert purpose in proc.stdout
    keys = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("  "))
    assert all(key in keys for key in STAGES[stage]["params"]), proc.stdout
    assert "dvc exp run -S" in proc.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_unknown_argument_exits_2_with_the_dvc_exp_run_hint(runs, stage):
    proc = runs[stage, "--bogus"]
    assert proc.returncode == 2, proc.stderr
    assert "unrecognized arguments: --bogus" in proc.stderr
    assert "dvc exp run -S " in proc.stderr
    assert proc.stdout == ""
