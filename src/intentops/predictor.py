"""One predictor for evaluate, batch prediction and serving: texts in, intents out, all preprocessing inside."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from intentops.errors import UserError

BUNDLE_META = "bundle.json"
FEATURIZER_FILE = "featurizer.joblib"
WEIGHTS_FILE = "net.pt"


class Predictor:
    """A fitted featurizer + classifier network + label list.

    Args:
        featurizer: has `transform(texts) -> {name: array}` (see intentops.models).
        net: a torch `nn.Module` mapping those arrays, as tensors, to logits (n, k).
        labels: intent names, index i = logit i.
        meta: the bundle record (model config, sizes) kept for reports.
    """

    def __init__(self, featurizer, net, labels: Sequence[str], meta: dict | None = None):
        self.featurizer, self.net, self.labels = featurizer, net.eval(), list(labels)
        self.meta = meta or {}

    # --- loading and saving: the only place that knows the bundle layout -------------------------------
    @classmethod
    def load(cls, bundle_dir: str | os.PathLike) -> Predictor:
        """Load a bundle written by `save` (format "torch")."""
        import joblib
        import torch
        from hydra.utils import instantiate

        bundle_dir = Path(bundle_dir)
        meta_path = bundle_dir / BUNDLE_META
        if not meta_path.is_file():
            raise UserError(f"no model bundle at {bundle_dir}", where=str(meta_path),
                            fix="run the `train` stage (dvc repro train) or point at a folder it wrote")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != "torch":
            raise UserError(f"unsupported bundle format {meta.get('format')!r}", where=str(meta_path),
                            fix="re-run `train` with this version of intentops")
        featurizer = joblib.load(bundle_dir / FEATURIZER_FILE)
        net = instantiate(meta["net"], **meta["net_kwargs"])
        net.load_state_dict(torch.load(bundle_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return cls(featurizer, net, meta["labels"], meta)

    def save(self, bundle_dir: str | os.PathLike, net_config: dict, net_kwargs: dict, extra: dict | None = None) -> None:
        """Write the bundle into an (empty or new) folder: meta json, featurizer pickle, state dict."""
        import joblib
        import torch

        bundle_dir = Path(bundle_dir)
        bundle_dir.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.featurizer, bundle_dir / FEATURIZER_FILE)
        torch.save(self.net.state_dict(), bundle_dir / WEIGHTS_FILE)
        self.meta = {"format": "torch", "labels": self.labels, "net": net_config, "net_kwargs": net_kwargs,
                     **(extra or {})}
        (bundle_dir / BUNDLE_META).write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")

    # --- inference ------------------------------------------------------------------------------------
    def predict_proba(self, texts: Sequence[str], batch_size: int = 256,
                      embeddings: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities, shape (n, k), rows in the order of `texts`.

        Args:
            embeddings: optional precomputed sentence embeddings for `texts` (skips re-encoding).
        """
        import torch

        from intentops.models.data import slice_batch

        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        features = self.featurizer.transform(texts, embeddings)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = slice_batch(features, np.arange(start, min(start + batch_size, len(texts))))
                out.append(torch.softmax(self.net(**batch).float(), dim=-1).numpy())
        return np.concatenate(out)

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[dict]:
        """[{"intent", "confidence", "top_k": [{"intent", "confidence"}, ...]}] per text."""
        proba = self.predict_proba(texts)
        k = min(top_k, len(self.labels))
        order = np.argsort(-proba, axis=1)[:, :k]
        results = []
        for row, idx in zip(proba, order, strict=True):
            top = [{"intent": self.labels[j], "confidence": float(row[j])} for j in idx]
            results.append({"intent": top[0]["intent"], "confidence": top[0]["confidence"], "top_k": top})
        return results
