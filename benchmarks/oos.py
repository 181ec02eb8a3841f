"""Out-of-scope benchmarks through the real pipeline; prints ONE JSON line.

    python benchmarks/oos.py [--mirror DIR] [--workdir DIR] [--experiment NAME|none] [-S calibrate.method=energy ...]
    python benchmarks/oos.py --proxy banking77 [--holdout 10] [--seed 42] [--workdir DIR] [--data-from .]

Default: CLINC150 (+experiment=clinc150_oos: data=clinc150, out-of-scope trained as a class; `--experiment none`
for plain data=clinc150) in a copy of the project (the main workspace's outputs are never touched),
`dvc repro` through `calibrate` and `evaluate`, then the test numbers at the operating point calibrate chose,
as `evaluate` measured them through the Predictor (reports/eval/metrics.json "operating_point"): in-scope
accuracy on the 4,500 in-scope test utterances (flagged-as-OOS counts as wrong), recall on the 1,000 oos_test
ones, AUROC and FPR at 95 % OOS recall (a top-1 on a trained oos class ranks as most out-of-scope); ECE and
temperature come from reports/calibrate/metrics.json.

--proxy banking77: Banking77 has no out-of-scope rows, so K intents (seeded) are held out: removed from
train, and their val/test rows relabelled out-of-scope, in a copy under data/proxy/; `train` and `calibrate`
run on it (a second params file points their paths there), so the model never saw the held-out intents and
the threshold is picked on val as on CLINC150.

--workdir keeps the copy (and its DVC cache) so a rerun skips ingest/embed; without it a temp dir is used.
The dataset comes from INTENTOPS_DATA_MIRROR (default ../shared/datasets relative to the project root).
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

import numpy as np

from intentops.config import PARAMS_ENV, load_params
from intentops.data.sources import MIRROR_ENV
from intentops.scratch import create_project, tool_env, write_project_params

ROOT = Path(__file__).resolve().parents[1]
PREP = ["ingest", "validate", "split", "embed"]


def sh(cwd: Path, env: dict, *cmd: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stderr[-3000:]}")


PROXY_PATHS = {
    "train": "data/proxy/train.parquet",
    "val": "data/proxy/val.parquet",
    "test": "data/proxy/test.parquet",
    "taxonomy": "data/proxy/taxonomy.json",
    "embeddings_dir": "data/proxy/embeddings",
    "model_dir": "models/proxy/train",
    "train_metrics": "reports/proxy/train.json",
    "calibration": "models/proxy/calibration.json",
    "calibration_stats": "models/proxy/calibration_ood.npz",
    "calibrate_metrics": "reports/proxy/calibrate.json",
    "calibrate_roc": "reports/proxy/roc.csv",
    "calibrate_risk_coverage": "reports/proxy/risk_coverage.csv",
}


def copy_prepared(src: Path, work: Path) -> None:
    """Copy `src`'s split, embeddings and taxonomy (what ingest ... embed wrote) into the project `work`."""
    paths = load_params(work / "params.yaml").paths
    for rel in (paths.processed_dir, paths.embeddings_dir, str(Path(paths.taxonomy).parent)):
        shutil.copytree(src / rel, work / rel, dirs_exist_ok=True)


def hold_out_intents(work: Path, k: int, seed: int, oos_label: str = "oos") -> list[str]:
    """Write a pseudo-OOS copy of the data under PROXY_PATHS: K seeded intents dropped from train and
    relabelled `oos_label` in val/test. The pipeline's own outputs stay as DVC wrote them."""
    import pandas as pd

    paths = load_params(work / "params.yaml").paths
    taxonomy = json.loads((work / paths.taxonomy).read_text())
    held = sorted(
        np.random.default_rng(seed).choice(sorted(taxonomy["labels"]), size=k, replace=False).tolist()
    )
    out_emb = work / PROXY_PATHS["embeddings_dir"]
    out_emb.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        frame = pd.read_parquet(work / paths[split])
        emb = np.load(work / paths.embeddings_dir / f"{split}.npy")
        mask = frame["label"].isin(held).to_numpy()
        if split == "train":
            frame, emb = frame[~mask].reset_index(drop=True), emb[~mask]
        else:
            frame.loc[mask, "label"] = oos_label
        frame.to_parquet(work / PROXY_PATHS[split], index=False)
        np.save(out_emb / f"{split}.npy", emb)
    taxonomy = {
        **taxonomy,
        "labels": [x for x in taxonomy["labels"] if x not in held],
        "oos_label": oos_label,
    }
    (work / PROXY_PATHS["taxonomy"]).write_text(json.dumps(taxonomy, indent=2) + "\n")
    return held


def summarise(work: Path, extra: dict) -> dict:
    paths = load_params(work / "params.yaml").paths
    metrics_file = extra.pop("metrics_file", None)
    m = json.loads((work / (metrics_file or paths.calibrate_metrics)).read_text())
    test = m["test"]
    # CLINC150: `evaluate` re-encoded test through the Predictor with calibration.json
    if metrics_file is None:
        test = {**test, **json.loads((work / paths.eval_metrics).read_text())["operating_point"]}
    return {
        **extra,
        "method": m["method"],
        "threshold": round(m["threshold"], 4),
        "temperature": round(m["temperature"], 4),
        "in_scope_accuracy": round(test["in_scope_accuracy"], 4),
        "accuracy_no_rejection": round(test["accuracy"], 4),
        "oos_recall": round(test.get("oos_recall", float("nan")), 4),
        "auroc": round(test.get("oos_auroc", float("nan")), 4),
        "fpr_at_95_tpr": round(test.get("oos_fpr_at_95_tpr", float("nan")), 4),
        "ece_before": round(test["ece_before"], 4),
        "ece_after": round(test["ece_after"], 4),
        "n_in_scope": test["n_in_scope"],
        "n_oos": test["n_oos"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mirror",
        default=os.environ.get(MIRROR_ENV) or str(ROOT / ".." / "shared" / "datasets"),
    )
    parser.add_argument("--workdir", help="keep the project copy here (reused on the next run)")
    parser.add_argument("--proxy", choices=["banking77"], help="held-out-intent proxy instead of CLINC150")
    parser.add_argument("--holdout", type=int, default=10, help="intents held out as pseudo-OOS (--proxy)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--data-from",
        help="--proxy: copy data/{processed,embeddings,interim} from this Banking77 "
        "project instead of running ingest..embed",
    )
    parser.add_argument(
        "--experiment",
        default="clinc150_oos",
        help="CLINC150: conf/experiment/NAME.yaml applied on top of data=clinc150 ('none': nothing)",
    )
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="extra Hydra override")
    args = parser.parse_args()
    env = tool_env({MIRROR_ENV: str(Path(args.mirror).resolve()), "WANDB_MODE": "disabled"})
    env.pop(PARAMS_ENV, None)  # the copy reads its own params.yaml
    data = ["data=banking77"] if args.proxy else ["data=clinc150"]
    if not args.proxy and args.experiment != "none":
        data.append(f"+experiment={args.experiment}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="intentops-oos-") as tmp:
        work = Path(args.workdir).resolve() if args.workdir else Path(tmp) / "project"
        create_project(work, ["logger=none", *data, f"seed={args.seed}", *args.overrides], root=ROOT, env=env)
        if args.proxy and args.data_from:  # reuse another project's split and embeddings (read only)
            copy_prepared(Path(args.data_from), work)
        else:
            for stage in PREP:
                sh(work, env, "dvc", "repro", "-s", stage)
        extra = {"dataset": "clinc150", "experiment": None if args.experiment == "none" else args.experiment}
        if args.proxy:
            held = hold_out_intents(work, args.holdout, args.seed)
            # Same stage code, pointed by a second params file at the proxy data and outputs.
            overrides = [
                *data,
                f"seed={args.seed}",
                "logger=none",
                *args.overrides,
                *(f"paths.{k}={v}" for k, v in PROXY_PATHS.items()),
            ]
            proxy_params = write_project_params(work, overrides, out="params_proxy.yaml")
            penv = dict(env, **{PARAMS_ENV: str(proxy_params)})
            for stage in ("train", "calibrate"):
                sh(work, penv, sys.executable, "-m", f"intentops.stages.{stage}")
            extra = {
                "dataset": "banking77-proxy",
                "held_out": held,
                "metrics_file": PROXY_PATHS["calibrate_metrics"],
            }
        else:
            # `evaluate` reads the baseline's metrics (the bar it reports next to the model).
            for stage in ("baseline", "train", "calibrate", "evaluate"):
                sh(work, env, "dvc", "repro", "-s", stage)
        print(json.dumps({**summarise(work, extra), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
