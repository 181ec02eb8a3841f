"""Few-shot Banking77 through the real `train` and `calibrate` stages; prints ONE JSON line per setting.

    python benchmarks/fewshot.py [--shots 10 30] [--seeds 42 1 2] [--workdir DIR] [--data-from .]

A setting is (shots, mode); each runs once per seed and reports the median over seeds, with the spread
(min, max) and every seed's figures:
- `all_intents`: `shots` seeded training examples of each of the 77 intents (from the official train file), the
  official test set; no out-of-scope rows anywhere, so `calibrate` meets `calibrate.target_without_oos.coverage`.
  Its accuracy before rejection is the figure published for 10- and 30-shot Banking77 (Casanueva et al. 2020).
- `held_out_intents`: 10 seeded intents held out as out-of-scope, as `benchmarks/oos.py --proxy banking77` does:
  never trained on; their `shots` examples become val's out-of-scope rows, their test rows are relabelled
  out-of-scope; `calibrate` meets `calibrate.target.oos_recall`.

Val is carved from each intent's examples as `split` does (`split.val_fraction`, `split.min_rows_to_carve`), so
val is small (1 or 3 rows per intent) and `train.crossfit` picks the memory weight, the temperature and the
threshold on out-of-fold rows. The sentence embeddings come from a Banking77 project's `embed` outputs
(`--data-from`, default this project; without them, ingest ... embed run in the work dir first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from oos import PREP, copy_prepared, sh

from intentops.config import PARAMS_ENV, load_params
from intentops.data.sources import MIRROR_ENV
from intentops.scratch import create_project, tool_env, write_project_params
from intentops.stages.split import stratified_holdout

ROOT = Path(__file__).resolve().parents[1]
MODES = ("all_intents", "held_out_intents")
OOS = "oos"
FEWSHOT_PATHS = {
    "train": "data/fewshot/train.parquet",
    "val": "data/fewshot/val.parquet",
    "test": "data/fewshot/test.parquet",
    "taxonomy": "data/fewshot/taxonomy.json",
    "embeddings_dir": "data/fewshot/embeddings",
    "model_dir": "models/fewshot/train",
    "train_metrics": "reports/fewshot/train.json",
    "run_facts_dir": "reports/fewshot/runs",
    "calibration": "models/fewshot/calibration.json",
    "calibration_stats": "models/fewshot/calibration_ood.npz",
    "calibrate_metrics": "reports/fewshot/calibrate.json",
    "calibrate_roc": "reports/fewshot/roc.csv",
    "calibrate_risk_coverage": "reports/fewshot/risk_coverage.csv",
}
# Published Banking77 test accuracy (%), 77 intents, training on `shots` examples per intent. Casanueva et al.
# 2020, "Efficient Intent Detection with Dual Sentence Encoders" (NLP4ConvAI), Table 3; later work as cited.
PUBLISHED = {
    10: {
        "USE+ConveRT (Casanueva et al. 2020)": 85.19,
        "USE (Casanueva et al. 2020)": 84.23,
        "BERT-tuned (Casanueva et al. 2020)": 83.42,
        "ConveRT (Casanueva et al. 2020)": 83.32,
        "CPFT (Zhang et al. 2021)": 87.20,
    },
    30: {},
}


def pool(work: Path) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray, list[str]]:
    """The official train rows (the project's train + val) and test rows, with embeddings, and the intents."""
    paths = load_params(work / "params.yaml").paths
    frames = {s: pd.read_parquet(work / paths[s]) for s in ("train", "val", "test")}
    emb = {s: np.load(work / paths.embeddings_dir / f"{s}.npy") for s in frames}
    train = pd.concat([frames["train"], frames["val"]], ignore_index=True)
    labels = sorted(json.loads((work / paths.taxonomy).read_text())["labels"])
    return train, np.concatenate([emb["train"], emb["val"]]), frames["test"], emb["test"], labels


def sample(train: pd.DataFrame, shots: int, seed: int) -> np.ndarray:
    """Row positions of `shots` seeded examples per intent."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.permutation(np.flatnonzero(train["label"].to_numpy() == label))[:shots]
        for label in sorted(set(train["label"]))
    ]
    return np.sort(np.concatenate(picks))


def subset(data: tuple, n_intents: int | None, seed: int) -> tuple:
    """`data` restricted to `n_intents` seeded intents (all when None): a smaller taxonomy, like a team's own."""
    train, train_emb, test, test_emb, labels = data
    if not n_intents or n_intents >= len(labels):
        return data
    keep = sorted(np.random.default_rng(seed + 7).choice(labels, size=n_intents, replace=False).tolist())
    tr, te = train["label"].isin(keep).to_numpy(), test["label"].isin(keep).to_numpy()
    return (
        train[tr].reset_index(drop=True),
        train_emb[tr],
        test[te].reset_index(drop=True),
        test_emb[te],
        keep,
    )


def write_setting(work: Path, data: tuple, shots: int, seed: int, mode: str, split_cfg) -> list[str]:
    """Write one setting's train/val/test (and embeddings, taxonomy) under FEWSHOT_PATHS; returns the held-out
    intents (empty for `all_intents`): 10 of Banking77's 77, as many in proportion of a subset."""
    train, train_emb, test, test_emb, labels = data
    picked = sample(train, shots, seed)
    rows, emb = train.iloc[picked].reset_index(drop=True), train_emb[picked]
    held = []
    if mode == "held_out_intents":
        size = max(1, round(len(labels) * 10 / 77))
        held = sorted(np.random.default_rng(seed).choice(labels, size=size, replace=False).tolist())
    is_held = rows["label"].isin(held).to_numpy()
    carve = stratified_holdout(rows[~is_held], split_cfg.val_fraction, seed + 1, split_cfg.min_rows_to_carve)
    to_val = np.zeros(len(rows), dtype=bool)
    to_val[np.flatnonzero(~is_held)[carve.to_numpy()]] = True
    out = {
        "train": (rows[~is_held & ~to_val], emb[~is_held & ~to_val]),
        "val": (
            rows[is_held | to_val].assign(label=lambda f: f["label"].where(~f["label"].isin(held), OOS)),
            emb[is_held | to_val],
        ),
        "test": (test.assign(label=test["label"].where(~test["label"].isin(held), OOS)), test_emb),
    }
    (work / FEWSHOT_PATHS["embeddings_dir"]).mkdir(parents=True, exist_ok=True)
    for split, (frame, vectors) in out.items():
        frame.reset_index(drop=True).to_parquet(work / FEWSHOT_PATHS[split], index=False)
        np.save(work / FEWSHOT_PATHS["embeddings_dir"] / f"{split}.npy", vectors)
    taxonomy = {"labels": [x for x in labels if x not in held], "oos_label": OOS if held else None}
    (work / FEWSHOT_PATHS["taxonomy"]).write_text(json.dumps(taxonomy, indent=2) + "\n")
    return held


def run_setting(work: Path, env: dict, overrides: list[str]) -> dict:
    """`train` then `calibrate` on the written setting; the figures the JSON line reports."""
    params = write_project_params(work, overrides, out="params_fewshot.yaml")
    penv = dict(env, **{PARAMS_ENV: str(params)})
    t0 = time.perf_counter()
    for stage in ("train", "calibrate"):
        sh(work, penv, sys.executable, "-m", f"intentops.stages.{stage}")
    seconds = time.perf_counter() - t0
    cal = json.loads((work / FEWSHOT_PATHS["calibrate_metrics"]).read_text())
    train = json.loads((work / FEWSHOT_PATHS["train_metrics"]).read_text())
    test, rows = cal["test"], cal["calibration_rows"]
    ((target_name, target),) = cal["target"].items()
    figures = {
        "intents": len(json.loads((work / FEWSHOT_PATHS["taxonomy"]).read_text())["labels"]),
        "accuracy_before_rejection": test["accuracy"],
        "in_scope_accuracy": test["in_scope_accuracy"],
        "coverage": test["coverage"],
        "oos_recall": test.get("oos_recall"),
        "target": {target_name: target},
        "test_minus_target": test[target_name] - target,
        "expected": {k: v for k, v in rows["expected"].items()},
        "calibrated_on": rows["source"],
        "warnings": len(cal["warnings"]),
        "memory_weight": (train.get("memory") or {}).get("weight"),
        "seconds": round(seconds, 1),
    }
    return figures


def summarise(shots: int, mode: str, runs: dict[int, dict]) -> dict:
    """Medians over seeds, with (min, max), of every numeric figure; the per-seed records."""
    keys = [
        "accuracy_before_rejection",
        "in_scope_accuracy",
        "coverage",
        "oos_recall",
        "test_minus_target",
        "seconds",
    ]
    first = next(iter(runs.values()))
    line = {
        "shots": shots,
        "mode": mode,
        "intents": first["intents"],
        "seeds": sorted(runs),
        "target": next(iter(runs.values()))["target"],
    }
    for key in keys:
        values = [r[key] for r in runs.values() if r[key] is not None]
        if values:
            line[key] = {
                "median": round(statistics.median(values), 4),
                "min": round(min(values), 4),
                "max": round(max(values), 4),
            }
    if mode == "all_intents" and PUBLISHED.get(shots) and first["intents"] == 77:
        line["published_accuracy_pct"] = PUBLISHED[shots]
    line["per_seed"] = {
        str(seed): {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        for seed, r in runs.items()
    }
    return line


def prepare(work: Path, env: dict, data_from: str | None) -> None:
    """Banking77's split and embeddings in `work`: copied from `data_from`, else ingest ... embed run there."""
    paths = load_params(work / "params.yaml").paths
    if data_from and (Path(data_from) / paths.embeddings_dir / "test.npy").is_file():
        copy_prepared(Path(data_from), work)
        return
    for stage in PREP:
        sh(work, env, "dvc", "repro", "-s", stage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--intents",
        type=int,
        help="a seeded subset of this many intents (per seed), as a team's smaller taxonomy",
    )
    parser.add_argument("--workdir", help="keep the project copy here (reused on the next run)")
    parser.add_argument(
        "--data-from", default=str(ROOT), help="a Banking77 project whose split and embed outputs to reuse"
    )
    parser.add_argument(
        "--mirror", default=os.environ.get(MIRROR_ENV) or str(ROOT / ".." / "shared" / "datasets")
    )
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="extra Hydra override")
    args = parser.parse_args()
    env = tool_env({MIRROR_ENV: str(Path(args.mirror).resolve()), "WANDB_MODE": "disabled"})
    env.pop(PARAMS_ENV, None)
    base = ["data=banking77", "logger=none", "trainer.enable_progress_bar=false", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="intentops-fewshot-") as tmp:
        work = Path(args.workdir).resolve() if args.workdir else Path(tmp) / "project"
        create_project(work, base, root=ROOT, env=env)
        prepare(work, env, args.data_from)
        data = pool(work)
        split_cfg = load_params(work / "params.yaml").split
        for shots in args.shots:
            for mode in args.modes:
                runs = {}
                for seed in args.seeds:
                    held = write_setting(work, subset(data, args.intents, seed), shots, seed, mode, split_cfg)
                    overrides = [*base, f"seed={seed}", *(f"paths.{k}={v}" for k, v in FEWSHOT_PATHS.items())]
                    runs[seed] = run_setting(work, env, overrides) | ({"held_out": held} if held else {})
                    print(
                        f"fewshot: {shots}-shot {mode} seed {seed}: {json.dumps(runs[seed])}",
                        file=sys.stderr,
                        flush=True,
                    )
                print(json.dumps(summarise(shots, mode, runs)), flush=True)


if __name__ == "__main__":
    main()
