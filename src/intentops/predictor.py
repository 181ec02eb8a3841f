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

    def __init__(
        self,
        featurizer,
        net,
        labels: Sequence[str],
        meta: dict | None = None,
        calibration: dict | None = None,
    ):
        self.featurizer, self.net, self.labels = featurizer, net.eval(), list(labels)
        self.meta = meta or {}
        # What `predict` applies through intentops.ood.postprocess: temperature, out-of-scope method and
        # threshold, review thresholds (calibration.json in the bundle; none = T 1, nothing flagged).
        self.calibration = calibration or {}

    # --- loading and saving: the only place that knows the bundle layout -------------------------------
    @classmethod
    def load(
        cls, bundle_dir: str | os.PathLike, threads: int | None = None, variant: str | None = None
    ) -> Predictor:
        """Load a bundle: one written by `save` (format "torch") or by the `export` stage (format "onnx").

        Args:
            threads: ONNX Runtime intra-op threads (see `OnnxPredictor.from_bundle`); torch uses its global setting.
            variant: an ONNX bundle's graph, "fp32" (default) or "int8".
        """
        import joblib
        import torch
        from hydra.utils import instantiate

        bundle_dir = Path(bundle_dir)
        meta_path = bundle_dir / BUNDLE_META
        if not meta_path.is_file():
            raise UserError(
                f"no model bundle at {bundle_dir}",
                where=str(meta_path),
                fix="run the `train` stage (dvc repro train) or point at a folder it wrote",
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") == "onnx":
            return OnnxPredictor.from_bundle(
                bundle_dir, meta, None if variant in (None, "fp32") else variant, intra_op_num_threads=threads
            )
        if variant not in (None, "fp32"):
            raise UserError(
                f"a torch bundle has no {variant!r} variant",
                where=str(meta_path),
                fix="serve the exported ONNX bundle (models/bundle or a registry version) for int8",
            )
        if meta.get("format") != "torch":
            raise UserError(
                f"unsupported bundle format {meta.get('format')!r}",
                where=str(meta_path),
                fix="re-run `train` with this version of intentops",
            )
        featurizer = joblib.load(bundle_dir / FEATURIZER_FILE)
        net = instantiate(meta["net"], **meta["net_kwargs"])
        net.load_state_dict(torch.load(bundle_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return cls(featurizer, net, meta["labels"], meta, read_calibration(bundle_dir))

    def save(
        self, bundle_dir: str | os.PathLike, net_config: dict, net_kwargs: dict, extra: dict | None = None
    ) -> None:
        """Write the bundle into an (empty or new) folder: meta json, featurizer pickle, state dict."""
        import joblib
        import torch

        bundle_dir = Path(bundle_dir)
        bundle_dir.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.featurizer, bundle_dir / FEATURIZER_FILE)
        torch.save(self.net.state_dict(), bundle_dir / WEIGHTS_FILE)
        self.meta = {
            "format": "torch",
            "labels": self.labels,
            "net": net_config,
            "net_kwargs": net_kwargs,
            **(extra or {}),
        }
        (bundle_dir / BUNDLE_META).write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")

    # --- inference ------------------------------------------------------------------------------------
    def logits(
        self, texts: Sequence[str], batch_size: int = 256, embeddings: np.ndarray | None = None
    ) -> np.ndarray:
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

    def predict_proba(
        self, texts: Sequence[str], batch_size: int = 256, embeddings: np.ndarray | None = None
    ) -> np.ndarray:
        """Class probabilities, shape (n, k), rows in the order of `texts` (softmax of `logits`)."""
        return softmax(self.logits(texts, batch_size, embeddings))

    def outputs(
        self, texts: Sequence[str], need_embeddings: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (n, k), sentence embeddings (n, d) or None); embeddings only when asked for."""
        if need_embeddings:
            raise UserError(
                "this torch bundle cannot score out-of-scope by embedding distance",
                where="calibration.json: ood.method",
                fix="serve the exported ONNX bundle (models/bundle), or calibrate with msp or energy",
            )
        return self.logits(texts), None

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[dict]:
        """Per text: intent, confidence, top_k [{"intent", "confidence"}], out_of_scope, reason, needs_review.

        `intentops.ood.postprocess` applies the bundle's calibration (the same function `calibrate` and
        `evaluate` measure): `reason` is "out_of_distribution", "low_confidence", "ambiguous" or None, and
        `out_of_scope` (= needs_review: the text goes to the review queue) is true whenever there is one.
        """
        from intentops.ood import EMBEDDING_METHODS, postprocess

        texts = list(texts)
        if not texts:
            return []
        cal = self.calibration
        logits, emb = self.outputs(texts, (cal.get("ood") or {}).get("method") in EMBEDDING_METHODS)
        out = postprocess(logits, cal, emb)
        proba = out["proba"]
        k = min(top_k, len(self.labels))
        order = np.argsort(-proba, axis=1)[:, :k]
        labels = self.labels
        results = []
        for row, idx, reason in zip(proba.tolist(), order.tolist(), out["reason"].tolist(), strict=True):
            top = [{"intent": labels[j], "confidence": row[j]} for j in idx]
            flagged = reason is not None
            results.append(
                {
                    "intent": top[0]["intent"],
                    "confidence": top[0]["confidence"],
                    "top_k": top,
                    "out_of_scope": flagged,
                    "reason": reason,
                    "needs_review": flagged,
                }
            )
        return results


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64 then back to float32."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def read_calibration(bundle_dir: Path) -> dict:
    """The bundle's calibration.json (+ its out-of-scope statistics) in `ood.postprocess`'s shape; {} if none."""
    from intentops.ood import load_calibration

    path = bundle_dir / CALIBRATION_FILE
    return load_calibration(path) if path.is_file() else {}


class OnnxPredictor(Predictor):
    """The exported bundle: `tokenizers` + the pickled sklearn TF-IDF + one ONNX Runtime graph.

    The graph maps input_ids/attention_mask (b, L) int64 and, when the model reads them, "tfidf" (b, V) float32
    to logits (b, k); the temperature from calibration.json divides the logits before the softmax. Needs neither
    torch nor sentence-transformers at serving time.
    """

    def __init__(
        self,
        session,
        tokenizer,
        vectorizer,
        labels: Sequence[str],
        meta: dict,
        calibration: dict | None = None,
        card: dict | None = None,
    ):
        # Deliberately not Predictor.__init__: there is no featurizer or torch net here.
        self.session, self.tokenizer, self.vectorizer = session, tokenizer, vectorizer
        self.labels, self.meta = list(labels), meta
        self.calibration = calibration or {}
        self.card = card or {}
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        # A weightless FeatureUnion is transformed part by part: the same sklearn transforms and the same
        # hstack, without the union's joblib dispatch, which costs more than the transform for a few texts.
        parts = getattr(vectorizer, "transformer_list", None)
        self._tfidf_parts = (
            [t for _, t in parts]
            if parts
            and getattr(vectorizer, "transformer_weights", 1) is None
            and all(hasattr(t, "transform") for _, t in parts)
            else None
        )

    @property
    def version(self) -> str | None:
        return self.meta.get("version")

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike,
        meta: dict | None = None,
        variant: str | None = None,
        intra_op_num_threads: int | None = None,
    ) -> OnnxPredictor:
        """Load an ONNX bundle; `variant` picks a graph from bundle.json "variants" (e.g. "int8").

        Threads: the argument, else $INTENTOPS_ORT_THREADS, else the bundle's setting, else every core.
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        bundle_dir = Path(bundle_dir)
        meta = meta or json.loads((bundle_dir / BUNDLE_META).read_text(encoding="utf-8"))
        variants = meta.get("variants", {})
        if variant is not None and variant not in variants:
            raise UserError(
                f"bundle has no {variant!r} model",
                where=str(bundle_dir / BUNDLE_META),
                fix=f"choose one of {sorted(variants)} (int8 needs export.quantize=true)",
            )
        model_file = variants[variant] if variant else meta.get("model_file", ONNX_FILE)
        threads = (
            intra_op_num_threads
            or int(os.environ.get(ORT_THREADS_ENV) or 0)
            or meta.get("session", {}).get("intra_op_num_threads")
            or os.cpu_count()
            or 1
        )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        if int(threads) > 1:
            # Idle pool threads sleep instead of spinning: on a small host they would take CPU from the
            # HTTP proxy and from the tokeniser between calls.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(bundle_dir / model_file), opts, providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(bundle_dir / TOKENIZER_FILE))
        vectorizer = None
        if (bundle_dir / TFIDF_FILE).is_file():
            import joblib

            vectorizer = joblib.load(bundle_dir / TFIDF_FILE)

        def read(name: str) -> dict | list | None:
            path = bundle_dir / name
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

        return cls(
            session,
            tokenizer,
            vectorizer,
            read(LABELS_FILE),
            meta,
            read_calibration(bundle_dir),
            read(CARD_FILE),
        )

    def feeds(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch: token ids padded to the batch's longest text, TF-IDF densified."""
        # sentence-transformers strips each text before tokenising; do the same so the two stay identical.
        enc = self.tokenizer.encode_batch([t.strip() for t in texts])
        feed = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        }
        if "tfidf" in self.input_names:
            feed["tfidf"] = self.tfidf(list(texts))
        return {k: v for k, v in feed.items() if k in self.input_names}

    def tfidf(self, texts: list[str]) -> np.ndarray:
        """The fitted TF-IDF features of `texts`, dense float32 (b, V)."""
        import scipy.sparse as sp
        import sklearn

        # Strings in, so nothing to validate: sklearn's per-call checks are a large part of a small batch.
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            if self._tfidf_parts is None:
                x = self.vectorizer.transform(texts)
            else:
                x = sp.hstack([t.transform(texts) for t in self._tfidf_parts], format="csr")
        return x.astype(np.float32).toarray()

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Raw logits (n, k), rows in the order of `texts`; batches are formed by length to limit padding."""
        return self.outputs(texts, batch_size=batch_size)[0]

    def outputs(
        self, texts: Sequence[str], need_embeddings: bool = False, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (n, k), embeddings (n, d) or None), rows in the order of `texts`.

        One session call for up to `batch_size` texts; longer lists are cut into batches of similar length
        to limit padding. The graph's "embedding" output (exports since out-of-scope support) is fetched
        only when asked for.
        """
        texts = [str(t) for t in texts]
        names = ["logits"]
        if need_embeddings:
            if "embedding" not in self.output_names:
                raise UserError(
                    "this bundle's graph has no embedding output, which the out-of-scope method needs",
                    where="model.onnx outputs",
                    fix="re-run `dvc repro export` with this version",
                )
            names.append("embedding")
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32), None
        if len(texts) <= batch_size:  # the serving case: one call, no reordering
            got = self.session.run(names, self.feeds(texts))
            return got[0], (got[1] if need_embeddings else None)
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        emb = None
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            got = self.session.run(names, self.feeds([texts[i] for i in idx]))
            out[idx] = got[0]
            if need_embeddings:
                emb = np.zeros((len(texts), got[1].shape[1]), dtype=np.float32) if emb is None else emb
                emb[idx] = got[1]
        return out, emb

    def predict_proba(
        self, texts: Sequence[str], batch_size: int = 64, embeddings: np.ndarray | None = None
    ) -> np.ndarray:
        """Calibrated class probabilities (n, k). `embeddings` is not accepted: the graph encodes the texts."""
        if embeddings is not None:
            raise UserError(
                "precomputed embeddings cannot be fed to an ONNX bundle",
                where="predict_proba(embeddings=...)",
                fix="pass only the texts; the ONNX graph runs the encoder itself",
            )
        if not len(texts):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return softmax(self.logits(texts, batch_size), float(self.calibration.get("temperature", 1.0)))
