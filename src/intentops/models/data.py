"""Feature tables as plain arrays, batched by index, and the LightningDataModule over them."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

# A feature table: name -> array with one row per example (dense numpy or scipy CSR).
Features = dict[str, "np.ndarray | sp.csr_matrix"]


def n_rows(features: Features) -> int:
    return next(iter(features.values())).shape[0]


def slice_batch(features: Features, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows `idx` of every array as tensors: sparse rows are densified per batch, never the whole table."""
    out = {}
    for name, arr in features.items():
        rows = arr[idx]
        if sp.issparse(rows):
            rows = rows.toarray()
        out[name] = torch.from_numpy(np.ascontiguousarray(rows))
    if "attention_mask" in out:
        # Trim padding columns no sequence in this batch uses: (b, L) -> (b, longest).
        longest = max(int(out["attention_mask"].sum(1).max()), 1)
        out = {k: (v[:, :longest] if k in ("input_ids", "attention_mask") else v) for k, v in out.items()}
    return out


def collate(features: Features, labels: np.ndarray | None, idx: list[int]) -> dict[str, torch.Tensor]:
    idx = np.asarray(idx)
    batch = slice_batch(features, idx)
    if labels is not None:
        batch["label"] = torch.from_numpy(labels[idx].astype(np.int64))
    return batch


class IntentDataModule(pl.LightningDataModule):
    """Train/val/test feature tables with integer labels; batches are dicts of tensors plus "label"."""

    def __init__(
        self,
        features: dict[str, Features],
        labels: dict[str, np.ndarray],
        batch_size: int = 128,
        eval_batch_size: int = 512,
    ):
        super().__init__()
        self.features, self.labels = features, labels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            range(n_rows(self.features[split])),
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=partial(collate, self.features[split], self.labels[split]),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
