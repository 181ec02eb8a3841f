"""Out-of-scope operating points on a project copy that `benchmarks/oos.py --workdir DIR` trained: one JSON
line per (method, target), val and test side by side.

    python benchmarks/oos_sweep.py --workdir DIR [--methods msp,energy] [--targets 0.55,0.6,0.65,0.7]
        [--memory-weights 0,2.5,5]

Each line's threshold is chosen on val (in-scope val + oos_val) by `calibrate.run_calibrate`, exactly as the
`calibrate` stage does; compare settings by their val columns, the test ones are for the report only.
--memory-weights re-weights the head's nearest-neighbour memory (minilm_head; attached after training, so
this is what training with `model.knn_weight_grid=[w]` gives, without retraining).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    from omegaconf import OmegaConf

    from intentops.config import load_params
    from intentops.inference.predictor import Predictor
    from intentops.io import read_json
    from intentops.models.labels import encode_with_oos
    from intentops.stages.calibrate import run_calibrate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a project copy benchmarks/oos.py --workdir ran in")
    parser.add_argument("--methods", default="msp,energy")
    parser.add_argument("--targets", default="0.55,0.6,0.65,0.7")
    parser.add_argument("--memory-weights", help="comma-separated; default: the bundle's own weight")
    args = parser.parse_args()
    from intentops.inference.ood import EMBEDDING_METHODS

    # The sweep re-scores val/test logits only; embedding-distance methods need the train stats calibrate fits.
    unsupported = sorted(set(args.methods.split(",")) & set(EMBEDDING_METHODS))
    if unsupported:
        raise SystemExit(
            f"--methods {','.join(unsupported)}: not swept here (needs train embeddings); use msp/energy"
        )
    work = Path(args.workdir)
    params = load_params(work / "params.yaml")
    paths = params.paths
    predictor = Predictor.load(work / paths.model_dir)
    oos_label = read_json(work / paths.taxonomy).get("oos_label") or "oos"
    oos_index = predictor.labels.index(oos_label) if oos_label in predictor.labels else None
    frames = {s: pd.read_parquet(work / paths[s]) for s in ("val", "test")}
    emb = {s: np.load(work / paths.embeddings_dir / f"{s}.npy") for s in frames}
    ys = {s: encode_with_oos(frames[s], predictor.labels, oos_label) for s in frames}
    base = OmegaConf.to_container(params.calibrate, resolve=True)
    weights = [None] if not args.memory_weights else [float(w) for w in args.memory_weights.split(",")]
    if args.memory_weights and not len(getattr(predictor.net, "bank", ())):
        raise SystemExit(
            "--memory-weights: the bundle has no memory (trained with weight 0); retrain with w > 0"
        )
    for weight in weights:
        if weight is not None:
            predictor.net.knn_weight = weight
        logits = {s: predictor.logits(frames[s]["text"].tolist(), emb[s], batch_size=512) for s in frames}
        for method in args.methods.split(","):
            for target in map(float, args.targets.split(",")):
                cfg = {**base, "method": method, "target": {"oos_recall": target}}
                m = run_calibrate(
                    logits["val"],
                    ys["val"],
                    logits["test"],
                    ys["test"],
                    cfg,
                    oos_label,
                    emb["val"],
                    emb["test"],
                    oos_index=oos_index,
                )["metrics"]
                row = {
                    "method": method,
                    "target": target,
                    "oos_class": oos_index is not None,
                    "memory_weight": getattr(predictor.net, "knn_weight", None),
                }
                for split in ("val", "test"):
                    row.update(
                        {
                            f"{split}_in_scope_accuracy": round(m[split]["in_scope_accuracy"], 4),
                            f"{split}_oos_recall": round(m[split]["oos_recall"], 4),
                            f"{split}_accuracy_no_rejection": round(m[split]["accuracy"], 4),
                            f"{split}_auroc": round(m[split]["oos_auroc"], 4),
                        }
                    )
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
