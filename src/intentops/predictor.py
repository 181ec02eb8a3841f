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
# ONNX bundles (format "onnx", written by the `export` stage).
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
TFIDF_FILE = "tfidf.joblib"
LABELS_FILE = "labels.json"
CALIBRATION_FILE = "calibration.json"
CARD_FILE = "card.json"
ORT_THREADS_ENV = "INTENTOPS_ORT_THREADS"


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
        if meta.get("format") == "onnx":
            return OnnxPredictor.from_bundle(bundle_dir, meta)
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
    def logits(self, texts: Sequence[str], batch_size: int = 256, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Raw logits, shape (n, k), rows in the order of `texts`.

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
                out.append(self.net(**batch).float().numpy())
        return np.concatenate(out)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 256,
                      embeddings: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities, shape (n, k), rows in the order of `texts` (softmax of `logits`)."""
        return softmax(self.logits(texts, batch_size, embeddings))

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


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64 then back to float32."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def needs_review(proba: np.ndarray, min_confidence: float, min_margin: float) -> np.ndarray:
    """(n,) bool: top-1 confidence below `min_confidence` or top1 - top2 margin below `min_margin`."""
    top2 = -np.sort(-proba, axis=1)[:, :2]
    margin = top2[:, 0] - (top2[:, 1] if proba.shape[1] > 1 else 0.0)
    return (top2[:, 0] < min_confidence) | (margin < min_margin)


class OnnxPredictor(Predictor):
    """The exported bundle: `tokenizers` + the pickled sklearn TF-IDF + one ONNX Runtime graph.

    The graph maps input_ids/attention_mask (b, L) int64 and, when the model reads them, "tfidf" (b, V) float32
    to logits (b, k); the temperature from calibration.json divides the logits before the softmax. Needs neither
    torch nor sentence-transformers at serving time.
    """

    def __init__(self, session, tokenizer, vectorizer, labels: Sequence[str], meta: dict,
                 calibration: dict | None = None, card: dict | None = None):
        # Deliberately not Predictor.__init__: there is no featurizer or torch net here.
        self.session, self.tokenizer, self.vectorizer = session, tokenizer, vectorizer
        self.labels, self.meta = list(labels), meta
        self.calibration = {"temperature": 1.0, "min_confidence": 0.0, "min_margin": 0.0, **(calibration or {})}
        self.card = card or {}
        self.input_names = [i.name for i in session.get_inputs()]

    @property
    def version(self) -> str | None:
        return self.meta.get("version")

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, meta: dict | None = None, variant: str | None = None,
                    intra_op_num_threads: int | None = None) -> OnnxPredictor:
        """Load an ONNX bundle; `variant` picks a graph from bundle.json "variants" (e.g. "int8").

        Threads: the argument, else $INTENTOPS_ORT_THREADS, else the bundle's setting, else every core.
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        bundle_dir = Path(bundle_dir)
        meta = meta or json.loads((bundle_dir / BUNDLE_META).read_text(encoding="utf-8"))
        variants = meta.get("variants", {})
        if variant is not None and variant not in variants:
            raise UserError(f"bundle has no {variant!r} model", where=str(bundle_dir / BUNDLE_META),
                            fix=f"choose one of {sorted(variants)} (int8 needs export.quantize=true)")
        model_file = variants[variant] if variant else meta.get("model_file", ONNX_FILE)
        threads = (intra_op_num_threads or int(os.environ.get(ORT_THREADS_ENV) or 0)
                   or meta.get("session", {}).get("intra_op_num_threads") or os.cpu_count() or 1)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(bundle_dir / model_file), opts, providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(bundle_dir / TOKENIZER_FILE))
        vectorizer = None
        if (bundle_dir / TFIDF_FILE).is_file():
            import joblib

            vectorizer = joblib.load(bundle_dir / TFIDF_FILE)

        def read(name: str) -> dict | list | None:
            path = bundle_dir / name
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

        return cls(session, tokenizer, vectorizer, read(LABELS_FILE), meta, read(CALIBRATION_FILE), read(CARD_FILE))

    def feeds(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch: token ids padded to the batch's longest text, TF-IDF densified."""
        # sentence-transformers strips each text before tokenising; do the same so the two stay identical.
        enc = self.tokenizer.encode_batch([t.strip() for t in texts])
        feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
        if "tfidf" in self.input_names:
            feed["tfidf"] = self.vectorizer.transform(list(texts)).astype(np.float32).toarray()
        return {k: v for k, v in feed.items() if k in self.input_names}

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Raw logits (n, k), rows in the order of `texts`; batches are formed by length to limit padding."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self.session.run(["logits"], self.feeds([texts[i] for i in idx]))[0]
        return out

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Calibrated class probabilities (n, k). `embeddings` is not accepted: the graph encodes the texts."""
        if embeddings is not None:
            raise UserError("precomputed embeddings cannot be fed to an ONNX bundle", where="predict_proba(embeddings=...)",
                            fix="pass only the texts; the ONNX graph runs the encoder itself")
        if not len(texts):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return softmax(self.logits(texts, batch_size), float(self.calibration["temperature"]))

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[dict]:
        """As `Predictor.predict`, plus "needs_review" from calibration.json's min_confidence and min_margin."""
        proba = self.predict_proba(texts)
        k = min(top_k, len(self.labels))
        order = np.argsort(-proba, axis=1)[:, :k]
        review = needs_review(proba, float(self.calibration["min_confidence"]), float(self.calibration["min_margin"]))
        results = []
        for row, idx, flag in zip(proba, order, review, strict=True):
            top = [{"intent": self.labels[j], "confidence": float(row[j])} for j in idx]
            results.append({"intent": top[0]["intent"], "confidence": top[0]["confidence"], "top_k": top,
                            "needs_review": bool(flag)})
        return results
