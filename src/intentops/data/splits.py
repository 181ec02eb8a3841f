"""The train/val/test splits that `split` writes, and the embeddings `embed` computes for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from intentops.errors import UserError

SPLITS = ("train", "val", "test")
# `train`'s out-of-fold logits over train + val (train.crossfit, a small val), in its bundle, for `calibrate`.
CROSSFIT_FILE = "crossfit.npz"


def read_splits(paths, root: Path = Path(".")) -> dict[str, pd.DataFrame]:
    """The three split tables (`paths.train`, `paths.val`, `paths.test`) under `root`."""
    return {s: pd.read_parquet(root / paths[s]) for s in SPLITS}


def read_embeddings(paths, frames: dict[str, pd.DataFrame], root: Path = Path(".")) -> dict[str, np.ndarray]:
    """The `embed` stage's vectors per split, checked row for row against `frames`."""
    emb_dir = root / paths.embeddings_dir
    out = {}
    for s in SPLITS:
        out[s] = np.load(emb_dir / f"{s}.npy")
        if len(out[s]) != len(frames[s]):
            raise UserError(
                f"{s} embeddings ({len(out[s])} rows) do not match {paths[s]} ({len(frames[s])})",
                where=str(emb_dir / f"{s}.npy"),
                fix="re-run `dvc repro embed`",
            )
    return out


def fold_ids(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold in [0, k) per row, stratified: each label's rows are shuffled (seeded) and dealt out in turn,
    continuing from where the previous label stopped, so folds differ in size by at most one row."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        out[idx] = (dealt + np.arange(len(idx))) % k
        dealt += len(idx)
    return out
