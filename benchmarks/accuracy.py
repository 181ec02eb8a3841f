"""Run the default pipeline on Banking77 from an empty cache and print ONE JSON line of results.

    python benchmarks/accuracy.py [--seeds 1 2 3] [--mirror DIR]

Each seed runs in a fresh scratch project (no data, no DVC cache), stage by stage with `dvc repro -s`,
so seconds_per_stage are real cold-cache times. The dataset comes from INTENTOPS_DATA_MIRROR
(default ../shared/datasets, relative to the project root).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from intentops.config import PARAMS_ENV, load_params
from intentops.data.sources import MIRROR_ENV
from intentops.scratch import create_project, tool_env

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "validate", "split", "baseline", "embed", "train", "evaluate"]


def run_once(seed: int, env: dict) -> dict:
    """The pipeline run stage by stage for one seed in a fresh scratch project; accuracy and seconds per stage."""
    with tempfile.TemporaryDirectory(prefix="intentops-bench-") as tmp:
        work = create_project(Path(tmp) / "project", [f"seed={seed}", "logger=none"], root=ROOT, env=env)
        paths = load_params(work / "params.yaml").paths

        def run(*cmd: str) -> None:
            subprocess.run(
                cmd,
                cwd=work,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )

        seconds = {}
        for stage in STAGES:
            t0 = time.perf_counter()
            try:
                run("dvc", "repro", "-s", stage)
            except subprocess.CalledProcessError as err:
                sys.exit(f"stage {stage} failed (seed {seed}):\n{err.stderr[-3000:]}")
            seconds[stage] = round(time.perf_counter() - t0, 1)
        ev = json.loads((work / paths.eval_metrics).read_text())
        base = json.loads((work / paths.baseline_metrics).read_text())
        return {
            "seed": seed,
            "model_accuracy": ev["test"]["accuracy"],
            "baseline_accuracy": base["test"]["accuracy"],
            "macro_f1": ev["test"]["macro_f1"],
            "ece": ev["test"]["ece"],
            "seconds_per_stage": seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument(
        "--mirror", default=os.environ.get(MIRROR_ENV) or str(ROOT / ".." / "shared" / "datasets")
    )
    args = parser.parse_args()
    env = tool_env({MIRROR_ENV: str(Path(args.mirror).resolve()), "WANDB_MODE": "disabled"})
    env.pop(PARAMS_ENV, None)  # each scratch project reads its own params.yaml
    runs = [run_once(seed, env) for seed in args.seeds]
    if len(runs) == 1:
        out = runs[0]
    else:
        mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        out = {key: mean(key) for key in ("model_accuracy", "baseline_accuracy", "macro_f1", "ece")}
        out["seconds_per_stage"] = {
            s: round(sum(r["seconds_per_stage"][s] for r in runs) / len(runs), 1) for s in STAGES
        }
        out["per_seed"] = runs
    print(json.dumps(out))


if __name__ == "__main__":
    main()
