"""Run the default pipeline on Banking77 from an empty cache and print ONE JSON line of results.

    python benchmarks/accuracy.py [--seeds 1 2 3] [--mirror DIR]

Each seed runs in a fresh copy of the project (no data, no DVC cache), stage by stage with `dvc repro -s`,
so seconds_per_stage are real cold-cache times. The dataset comes from INTENTOPS_DATA_MIRROR
(default ../shared/datasets, relative to the project root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "validate", "split", "baseline", "embed", "train", "evaluate"]
SKIP = {".git", ".venv", ".dvc", "data", "models", "reports", "wandb", "multirun", "outputs", ".pytest_cache",
        ".ruff_cache", "params.yaml", "dvc.lock"}


def run_once(seed: int, mirror: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="intentops-bench-") as tmp:
        work = Path(tmp) / "project"
        shutil.copytree(ROOT, work, ignore=lambda d, names: [n for n in names if Path(d) == ROOT and n in SKIP])
        (work / "data" / "external").mkdir(parents=True)
        run = lambda *cmd: subprocess.run(cmd, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL,  # noqa: E731
                                          stderr=subprocess.PIPE, text=True)
        run("dvc", "init", "--no-scm", "-q")
        shutil.copy(ROOT / ".dvc" / "config", work / ".dvc" / "config")
        run("dvc", "config", "core.no_scm", "true")
        run("intentops", "params", f"seed={seed}", "logger=none")
        seconds = {}
        for stage in STAGES:
            t0 = time.perf_counter()
            try:
                run("dvc", "repro", "-s", stage)
            except subprocess.CalledProcessError as err:
                sys.exit(f"stage {stage} failed (seed {seed}):\n{err.stderr[-3000:]}")
            seconds[stage] = round(time.perf_counter() - t0, 1)
        ev = json.loads((work / "reports/eval/metrics.json").read_text())
        base = json.loads((work / "reports/baseline/metrics.json").read_text())
        return {"seed": seed, "model_accuracy": ev["test"]["accuracy"], "baseline_accuracy": base["test"]["accuracy"],
                "macro_f1": ev["test"]["macro_f1"], "ece": ev["test"]["ece"], "seconds_per_stage": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--mirror", default=os.environ.get("INTENTOPS_DATA_MIRROR") or str(ROOT / ".." / "shared" / "datasets"))
    args = parser.parse_args()
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, INTENTOPS_DATA_MIRROR=str(Path(args.mirror).resolve()),
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), WANDB_MODE="disabled")
    runs = [run_once(seed, args.mirror, env) for seed in args.seeds]
    if len(runs) == 1:
        out = runs[0]
    else:
        mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        out = {key: mean(key) for key in ("model_accuracy", "baseline_accuracy", "macro_f1", "ece")}
        out["seconds_per_stage"] = {s: round(sum(r["seconds_per_stage"][s] for r in runs) / len(runs), 1) for s in STAGES}
        out["per_seed"] = runs
    print(json.dumps(out))


if __name__ == "__main__":
    main()
