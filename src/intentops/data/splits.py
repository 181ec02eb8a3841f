"""The train/val/test splits that `split` writes, and the embeddings `embed` computes for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from intentops.errors import UserError

SPLITS = ("train", "val", "test")


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
