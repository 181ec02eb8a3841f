"""Label encoding: intent names <-> the integer ids a model's logit columns use."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from intentops.data.taxonomy import Taxonomy
from intentops.errors import UserError


def label_space(taxonomy: Taxonomy, train_labels: pd.Series) -> list[str]:
    """The classes the model predicts: the taxonomy's, plus the out-of-scope label if training data has it."""
    labels = list(taxonomy.labels)
    oos = taxonomy.oos_label
    if oos and oos not in labels and (train_labels == oos).any():
        labels.append(oos)
    missing = sorted(set(train_labels) - set(labels))
    if missing:
        raise UserError(
            f"training labels missing from the taxonomy: {missing[:5]}",
            where="data/interim/taxonomy.json",
            fix="re-run `dvc repro ingest split`",
        )
    return labels


def label_ids(
    names: Iterable[str], labels: Sequence[str], unknown: int = -1, exclude: str | None = None
) -> np.ndarray:
    """Ids (n,) int64 of `names` in `labels` order; a name not in `labels` (or equal to `exclude`) gets `unknown`."""
    index = {name: i for i, name in enumerate(labels) if name != exclude}
    return np.fromiter((index.get(str(n), unknown) for n in names), dtype=np.int64)


def encode_labels(frame: pd.DataFrame, labels: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Keep rows whose label is in `labels`; return (rows, label ids, kept positions in the original frame)."""
    ids = label_ids(frame["label"], labels)
    keep = ids >= 0
    return frame[keep].reset_index(drop=True), ids[keep], np.flatnonzero(keep)


def encode_with_oos(frame: pd.DataFrame, labels: Sequence[str], oos_label: str | None = None) -> np.ndarray:
    """Label ids (n,), −1 for out-of-scope rows: labels the model does not know, and `oos_label` even where the
    model was trained on it as a class (split.oos_as_class)."""
    return label_ids(frame["label"], labels, exclude=oos_label)
