"""The int8 graph against fp32 on Banking77, CLINC150 and HWU64, through the real pipeline; prints ONE JSON line.

    python benchmarks/int8.py --workdir DIR [--datasets banking77 clinc150 hwu64] [--reps 3] [--speed-n 512]

Each dataset runs `dvc repro export` in its own scratch project under DIR (kept, so a rerun only redoes what
changed): Banking77 as the default pipeline, CLINC150 with +experiment=clinc150_oos, HWU64 through the own-CSV
path (data=csv) from the mirror's hwu64/KFold_1 files, text `answer_from_anno`, label `scenario_intent`
(scenario + "_" + intent, as DialoGLUE does). Per dataset it reports what `export` measured
(reports/export/metrics.json: accuracy of each graph on test, each graph's ECE / OOS recall under its own
calibration and the int8 graph's under fp32's) and bundle.json's `variant_checks`, plus the graphs' own
throughput: batched sentences/s of `session.run` alone (tokens and TF-IDF prepared beforehand, batches of 64
sorted by length, --speed-n test sentences), fp32 and int8 timed in turn in the same process, at 1 and 2
intra-op threads; median and range of --reps ratios. The dataset comes from INTENTOPS_DATA_MIRROR (default
../shared/datasets relative to the project root).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from intentops.config import PARAMS_ENV, load_params
from intentops.data.sources import MIRROR_ENV
from intentops.scratch import create_project, tool_env

ROOT = Path(__file__).resolve().parents[1]
HWU_FILES = {"train": "hwu64_train.csv", "test": "hwu64_test.csv"}
DATASETS = {
    "banking77": [],
    "clinc150": ["data=clinc150", "+experiment=clinc150_oos"],
    "hwu64": [
        "data=csv",
        f"data.files.train.path=data/external/{HWU_FILES['train']}",
        f"data.files.test={{path:data/external/{HWU_FILES['test']}}}",
        "data.text_column=answer_from_anno",
        "data.label_column=scenario_intent",
    ],
}


def write_hwu64_csvs(kfold: Path, dest: Path) -> None:
    """HWU64 KFold_1 (one ';'-separated CSV per intent) -> one train and one test CSV with `scenario_intent`."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, folder in (("train", "trainset"), ("test", "testset_csv")):
        rows = []
        for path in sorted((kfold / folder).glob("*.csv")):
            with open(path, newline="", encoding="utf-8") as fh:
                rows += [
                    {
                        "answer_from_anno": r["answer_from_anno"],
                        "scenario_intent": f"{r['scenario']}_{r['intent']}",
                    }
                    for r in csv.DictReader(fh, delimiter=";")
                ]
        with open(dest / HWU_FILES[split], "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, ["answer_from_anno", "scenario_intent"])
            writer.writeheader()
            writer.writerows(rows)


def session_throughput(session, feeds: list[dict]) -> float:
    """Sentences per second of `session.run` over prepared batches (the graph alone)."""
    seconds, n = 0.0, 0
    for feed in feeds:
        t0 = time.perf_counter()
        session.run(["logits"], feed)
        seconds += time.perf_counter() - t0
        n += len(feed["input_ids"])
    return n / seconds


def speedup(bundle: Path, texts: list[str], reps: int) -> dict:
    """int8 / fp32 session throughput at 1 and 2 threads, each rep timing both graphs in turn."""
    from intentops.inference.predictor import OnnxPredictor, onnx_session

    prep = OnnxPredictor.from_bundle(bundle, intra_op_num_threads=1)
    order = np.argsort([len(t) for t in texts], kind="stable")
    feeds = [prep.feeds([texts[i] for i in order[s : s + 64]]) for s in range(0, len(texts), 64)]
    out = {}
    for threads in (1, 2):
        fp32 = onnx_session(bundle / "model.onnx", threads)
        int8 = onnx_session(bundle / "model.int8.onnx", threads)
        session_throughput(fp32, feeds[:2]), session_throughput(int8, feeds[:2])  # warm-up
        runs = [(session_throughput(fp32, feeds), session_throughput(int8, feeds)) for _ in range(reps)]
        ratios = [b / a for a, b in runs]
        out[f"threads_{threads}"] = {
            "fp32_sentences_per_s": round(statistics.median(a for a, _ in runs), 1),
            "int8_sentences_per_s": round(statistics.median(b for _, b in runs), 1),
            "speedup": round(statistics.median(ratios), 2),
            "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)],
        }
    return out


def run_dataset(name: str, work: Path, mirror: Path, env: dict, reps: int, speed_n: int) -> dict:
    """`dvc repro export` in the dataset's scratch project, then what export measured and the speed-up."""
    import pandas as pd

    create_project(work, ["logger=none", *DATASETS[name]], root=ROOT, env=env)
    if name == "hwu64":
        write_hwu64_csvs(mirror / "hwu64" / "KFold_1", work / "data" / "external")
    proc = subprocess.run(["dvc", "repro", "export"], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dvc repro export failed in {work}:\n{proc.stderr[-3000:]}")
    paths = load_params(work / "params.yaml").paths
    m = json.loads((work / paths.export_metrics).read_text())
    meta = json.loads((work / paths.bundle_dir / "bundle.json").read_text())
    test = pd.read_parquet(work / paths.test)["text"].tolist()
    sample = [
        test[i] for i in np.random.default_rng(0).choice(len(test), min(speed_n, len(test)), replace=False)
    ]
    return {
        "fp32_accuracy": m["fp32"]["accuracy"],
        "int8_accuracy": m["int8"]["accuracy"],
        "variant_check": meta.get("variant_checks", {}).get("int8"),
        "calibration": {
            "fp32": m["fp32"].get("calibration"),
            "int8": m["int8"].get("calibration"),
            "int8_under_fp32_calibration": m["int8"].get("calibration_fp32"),
        },
        "end_to_end_sentences_per_s": {v: m[v]["sentences_per_s"] for v in ("fp32", "int8")},
        "session_speedup": speedup(work / paths.bundle_dir, sample, reps),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="scratch projects go to WORKDIR/<dataset> (kept)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--speed-n", type=int, default=512, help="test sentences timed per rep")
    parser.add_argument(
        "--mirror", default=os.environ.get(MIRROR_ENV) or str(ROOT / ".." / "shared" / "datasets")
    )
    args = parser.parse_args()
    mirror = Path(args.mirror).resolve()
    env = tool_env({MIRROR_ENV: str(mirror), "WANDB_MODE": "disabled"})
    env.pop(PARAMS_ENV, None)  # each scratch project reads its own params.yaml
    t0 = time.perf_counter()
    out = {
        name: run_dataset(name, Path(args.workdir).resolve() / name, mirror, env, args.reps, args.speed_n)
        for name in args.datasets
    }
    print(json.dumps({**out, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
