"""The intent taxonomy that `ingest` writes: the labels, and the label of out-of-scope rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from intentops.errors import UserError

# The label out-of-scope rows carry when the taxonomy names none (CLINC150's own label).
DEFAULT_OOS_LABEL = "oos"


@dataclass(frozen=True)
class Taxonomy:
    labels: tuple[str, ...]
    oos_label: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> Taxonomy:
        """Read the taxonomy JSON that `ingest` writes ({"labels": [...], "oos_label": ...})."""
        path = Path(path)
        if not path.is_file():
            raise UserError("taxonomy not found", where=str(path), fix="run `dvc repro ingest` first")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls(tuple(record["labels"]), record.get("oos_label"))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"taxonomy is not a JSON object with a 'labels' list ({err})",
                where=str(path),
                fix="rerun `ingest`",
            ) from err

    @property
    def oos(self) -> str:
        """The label out-of-scope rows carry: the taxonomy's, else "oos" as in CLINC150 (Banking77 has none)."""
        return self.oos_label or DEFAULT_OOS_LABEL

    def trainable(self, label: str) -> bool:
        """Whether a label can go into training data: a taxonomy label or the dataset's out-of-scope label."""
        return label in self.labels or (self.oos_label is not None and label == self.oos_label)
