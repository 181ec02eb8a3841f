"""One Predictor contract, the same for torch and ONNX bundles: texts in, intents out, preprocessing inside.

`Predictor.load(bundle_dir)` returns a `TorchPredictor` (the bundle `train` writes) or an `OnnxPredictor`
(the bundle `export` writes). Evaluate, calibrate, export parity, promote, profile, serving and batch prediction
use only these methods, with one meaning for both:

    outputs(texts, need_embeddings, embeddings, batch_size) -> (raw logits (n, k), sentence embeddings (n, d) | None)
    logits(texts, embeddings, batch_size)        -> raw logits (n, k): NOT calibrated
    predict_proba(texts, embeddings, batch_size) -> calibrated probabilities (n, k): softmax(logits / T), T from
                                                    the bundle's calibration (1 when it has none)
    score(texts, embeddings, batch_size)         -> `ood.postprocess` of the outputs: calibrated probabilities,
                                                    top-1, out-of-scope and review flags, reasons
    predict(texts, top_k)                        -> one dict per text: intent, confidence, top_k, flags
    with_calibration(calibration)                -> the same model with another calibration

`embeddings` are precomputed sentence embeddings of `texts` (the `embed` stage's); only a model with a frozen
encoder takes them (TorchPredictor over `minilm_head`); an ONNX graph always encodes the texts itself.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from intentops.errors import UserError
from intentops.inference import bundle as layout
from intentops.inference.ood import (
    EMBEDDING_METHODS,
    load_calibration,
    postprocess,
    softmax,
    variant_calibration,
)

ORT_THREADS_ENV = "INTENTOPS_ORT_THREADS"


class Predictor:
    """What every bundle's predictor is: labels, the bundle record, its calibration and card, and `outputs`.

    Subclasses implement `outputs` (and `_default_batch`); everything else is shared.
    """

    _default_batch = 64

    def __init__(
        self, labels: Sequence[str], meta: dict, calibration: dict | None = None, card: dict | None = None
    ):
        self.labels, self.meta = list(labels), meta
        # What `score`/`predict` apply through intentops.inference.ood.postprocess: temperature, out-of-scope
        # method and threshold, review thresholds (calibration.json in the bundle; none = T 1, nothing flagged).
        self.calibration = calibration or {}
        self.card = card or {}

    @property
    def version(self) -> str | None:
        """The bundle's content version (ONNX bundles; None for a torch bundle)."""
        return self.meta.get("version")

    @classmethod
    def load(
        cls, bundle_dir: str | os.PathLike, threads: int | None = None, variant: str | None = None
    ) -> Predictor:
        """Load a bundle: one `train` wrote (format "torch") or one `export` wrote (format "onnx").

        Args:
            threads: ONNX Runtime intra-op threads (see `OnnxPredictor.from_bundle`); torch uses its global setting.
            variant: an ONNX bundle's graph, "fp32" (default) or "int8".
        """
        bundle_dir = Path(bundle_dir)
        meta = layout.read_meta(bundle_dir)
        where = str(bundle_dir / layout.BUNDLE_META)
        if meta.get("format") == "onnx":
            return OnnxPredictor.from_bundle(
                bundle_dir, meta, None if variant in (None, "fp32") else variant, intra_op_num_threads=threads
            )
        if variant not in (None, "fp32"):
            raise UserError(
                f"a torch bundle has no {variant!r} variant",
                where=where,
                fix="serve the exported ONNX bundle (models/bundle or a registry version) for int8",
            )
        if meta.get("format") != "torch":
            raise UserError(
                f"unsupported bundle format {meta.get('format')!r}",
                where=where,
                fix="re-run `train` with this version of intentops",
            )
        return TorchPredictor.from_bundle(bundle_dir, meta)

    # --- the shared contract ------------------------------------------------------------------------------
    def outputs(
        self,
        texts: Sequence[str],
        need_embeddings: bool = False,
        embeddings: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw logits (n, k), sentence embeddings (n, d) or None), rows in the order of `texts`."""
        raise NotImplementedError

    def logits(
        self, texts: Sequence[str], embeddings: np.ndarray | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Raw (uncalibrated) logits, shape (n, k), rows in the order of `texts`."""
        return self.outputs(texts, embeddings=embeddings, batch_size=batch_size)[0]

    def predict_proba(
        self, texts: Sequence[str], embeddings: np.ndarray | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Calibrated class probabilities (n, k): softmax of the logits over the bundle's temperature."""
        return softmax(
            self.logits(texts, embeddings, batch_size), float(self.calibration.get("temperature", 1.0))
        )

    def score(
        self, texts: Sequence[str], embeddings: np.ndarray | None = None, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """`ood.postprocess` of the texts under the bundle's calibration (what serving decides, as arrays)."""
        need = (self.calibration.get("ood") or {}).get("method") in EMBEDDING_METHODS
        logits, emb = self.outputs(texts, need, embeddings, batch_size)
        return postprocess(logits, self.calibration, emb)

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[dict]:
        """Per text: intent, confidence, top_k [{"intent", "confidence"}], out_of_scope, reason, needs_review.

        `reason` is "out_of_distribution", "low_confidence", "ambiguous" or None (see `ood.postprocess`);
        `needs_review` (the text goes to the review queue) is true whenever there is one, `out_of_scope` only for
        "out_of_distribution".
        """
        texts = list(texts)
        if not texts:
            return []
        out = self.score(texts)
        proba = out["proba"]
        order = np.argsort(-proba, axis=1)[:, : min(top_k, len(self.labels))]
        return [
            prediction_row(row, idx, reason, self.labels)
            for row, idx, reason in zip(proba.tolist(), order.tolist(), out["reason"].tolist(), strict=True)
        ]

    def with_calibration(self, calibration: dict) -> Predictor:
        """A shallow copy that applies `calibration` (the model and its sessions are shared)."""
        other = copy.copy(self)
        other.calibration = calibration
        return other

    def _empty(self) -> tuple[np.ndarray, None]:
        return np.zeros((0, len(self.labels)), dtype=np.float32), None


def prediction_row(proba: list[float], top: list[int], reason: str | None, labels: list[str]) -> dict:
    """One `predict` row from a probability row, its top-k column indices and its review reason.

    `out_of_scope` is true only for "out_of_distribution"; `needs_review` for any reason (see `ood.postprocess`).
    """
    top_k = [{"intent": labels[j], "confidence": proba[j]} for j in top]
    return {
        "intent": top_k[0]["intent"],
        "confidence": top_k[0]["confidence"],
        "top_k": top_k,
        "out_of_scope": reason == "out_of_distribution",
        "reason": reason,
        "needs_review": reason is not None,
    }


def read_calibration(bundle_dir: Path, variant: str | None = None) -> dict:
    """The bundle's calibration.json (+ its out-of-scope statistics) in `ood.postprocess`'s shape; {} if none.

    `variant` (an ONNX bundle's graph, e.g. "int8") gets the temperature and threshold export fitted on that
    graph's own outputs, where calibration.json has them ("variants"); otherwise the fp32 graph's.
    """
    path = bundle_dir / layout.CALIBRATION_FILE
    return variant_calibration(load_calibration(path), variant) if path.is_file() else {}


class TorchPredictor(Predictor):
    """A fitted featurizer + classifier network (torch `nn.Module`) + label list: the bundle `train` writes.

    Args:
        featurizer: has `transform(texts, embeddings) -> {name: array}` (see intentops.models); a frozen-encoder
            featurizer also has `encode(texts) -> (n, d)`.
        net: maps those arrays, as tensors, to logits (n, k).
    """

    _default_batch = 256

    def __init__(
        self,
        featurizer,
        net,
        labels: Sequence[str],
        meta: dict | None = None,
        calibration: dict | None = None,
        card: dict | None = None,
    ):
        super().__init__(labels, meta or {}, calibration, card)
        self.featurizer, self.net = featurizer, net.eval()

    @classmethod
    def from_bundle(cls, bundle_dir: Path, meta: dict) -> TorchPredictor:
        """Unpickle the featurizer, build the net from bundle.json's config and load its weights."""
        import joblib
        import torch
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            featurizer = joblib.load(bundle_dir / layout.FEATURIZER_FILE)
            net = instantiate(meta["net"], **meta["net_kwargs"])
        except (ImportError, AttributeError, InstantiationException) as err:
            raise UserError(
                f"this torch bundle names code that this version of intentops does not have ({err})",
                where=str(bundle_dir),
                fix="re-train it with this version (`dvc repro train`), then `dvc repro export` for serving",
            ) from err
        net.load_state_dict(
            torch.load(bundle_dir / layout.WEIGHTS_FILE, map_location="cpu", weights_only=True)
        )
        card = layout.read_json_file(bundle_dir / layout.CARD_FILE)
        return cls(featurizer, net, meta["labels"], meta, read_calibration(bundle_dir), card)

    def save(
        self, bundle_dir: str | os.PathLike, net_config: dict, net_kwargs: dict, extra: dict | None = None
    ) -> None:
        """Write the bundle into an (empty or new) folder: bundle.json, featurizer pickle, state dict, manifest.

        The manifest lets `bundle.verify_bundle` check the files before the featurizer is unpickled (a torch
        bundle has no content version; it is checked file by file)."""
        import joblib
        import torch

        from intentops.models.tfidf import strip_process_state

        bundle_dir = Path(bundle_dir)
        bundle_dir.mkdir(parents=True, exist_ok=True)
        strip_process_state(getattr(self.featurizer, "vectorizer", None))  # same fit, same bytes
        joblib.dump(self.featurizer, bundle_dir / layout.FEATURIZER_FILE)
        torch.save(self.net.state_dict(), bundle_dir / layout.WEIGHTS_FILE)
        self.meta = {
            "format": "torch",
            "labels": self.labels,
            "net": net_config,
            "net_kwargs": net_kwargs,
            **(extra or {}),
        }
        (bundle_dir / layout.BUNDLE_META).write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")
        layout.write_manifest(bundle_dir)

    def outputs(
        self,
        texts: Sequence[str],
        need_embeddings: bool = False,
        embeddings: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings come from `embeddings`, else from the featurizer's encoder when asked for or needed."""
        texts = [str(t) for t in texts]
        if not texts:
            return self._empty()
        encode = getattr(self.featurizer, "encode", None)  # frozen-encoder models: encode once, use twice
        if embeddings is None and need_embeddings:
            if encode is None:
                raise UserError(
                    f"model {self.meta.get('model')!r} computes no sentence embeddings, which the out-of-scope "
                    "method needs",
                    where="calibration.json: ood.method",
                    fix="calibrate with msp or energy, or train model=minilm_head",
                )
            embeddings = encode(texts)
        return self._net_logits(texts, embeddings, batch_size or self._default_batch), (
            embeddings if need_embeddings else None
        )

    def _net_logits(self, texts: list[str], embeddings: np.ndarray | None, batch_size: int) -> np.ndarray:
        import torch

        from intentops.models.data import slice_batch

        features = self.featurizer.transform(texts, embeddings)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = slice_batch(features, np.arange(start, min(start + batch_size, len(texts))))
                out.append(self.net(**batch).float().numpy())
        return np.concatenate(out)


class OnnxPredictor(Predictor):
    """The exported bundle: `tokenizers` + the pickled sklearn TF-IDF + one ONNX Runtime graph.

    The graph maps input_ids/attention_mask (b, L) int64 and, when the model reads them, "tfidf" (b, V) float32
    to logits (b, k) and the sentence embedding (b, d). Needs neither torch nor sentence-transformers.
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
        super().__init__(labels, meta, calibration, card)
        self.session, self.tokenizer, self.vectorizer = session, tokenizer, vectorizer
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

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike,
        meta: dict | None = None,
        variant: str | None = None,
        intra_op_num_threads: int | None = None,
    ) -> OnnxPredictor:
        """Load an ONNX bundle; `variant` picks a graph from bundle.json "variants" (e.g. "int8") and that
        graph's calibration (`read_calibration`).

        Threads: the argument, else $INTENTOPS_ORT_THREADS, else the bundle's setting, else every core.
        """
        from tokenizers import Tokenizer

        bundle_dir = Path(bundle_dir)
        meta = meta or layout.read_meta(bundle_dir)
        session = onnx_session(
            bundle_dir / model_file(bundle_dir, meta, variant), ort_threads(intra_op_num_threads, meta)
        )
        tokenizer = Tokenizer.from_file(str(bundle_dir / layout.TOKENIZER_FILE))
        vectorizer = None
        if (bundle_dir / layout.TFIDF_FILE).is_file():
            import joblib

            vectorizer = joblib.load(bundle_dir / layout.TFIDF_FILE)
        return cls(
            session,
            tokenizer,
            vectorizer,
            layout.read_json_file(bundle_dir / layout.LABELS_FILE),
            meta,
            read_calibration(bundle_dir, variant),
            layout.read_json_file(bundle_dir / layout.CARD_FILE),
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

    def outputs(
        self,
        texts: Sequence[str],
        need_embeddings: bool = False,
        embeddings: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One session call for up to `batch_size` texts; longer lists are cut into batches of similar length
        to limit padding. The graph's "embedding" output is fetched only when asked for."""
        if embeddings is not None:
            raise UserError(
                "precomputed embeddings cannot be fed to an ONNX bundle",
                where="Predictor.outputs(embeddings=...)",
                fix="pass only the texts; the ONNX graph runs the encoder itself",
            )
        texts = [str(t) for t in texts]
        names = ["logits", "embedding"] if need_embeddings else ["logits"]
        if need_embeddings and "embedding" not in self.output_names:
            raise UserError(
                "this bundle's graph has no embedding output, which the out-of-scope method needs",
                where="model.onnx outputs",
                fix="re-run `dvc repro export` with this version",
            )
        if not texts:
            return self._empty()
        batch_size = batch_size or self._default_batch
        if len(texts) <= batch_size:  # the serving case: one call, no reordering
            got = self.session.run(names, self.feeds(texts))
            return got[0], (got[1] if need_embeddings else None)
        return self._by_length(texts, names, batch_size)

    def _by_length(
        self, texts: list[str], names: list[str], batch_size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        emb = None
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            got = self.session.run(names, self.feeds([texts[i] for i in idx]))
            out[idx] = got[0]
            if len(names) > 1:
                emb = np.zeros((len(texts), got[1].shape[1]), dtype=np.float32) if emb is None else emb
                emb[idx] = got[1]
        return out, emb


def model_file(bundle_dir: Path, meta: dict, variant: str | None) -> str:
    """The graph file of `variant` (None: the bundle's fp32 graph)."""
    variants = meta.get("variants", {})
    if variant is not None and variant not in variants:
        raise UserError(
            f"bundle has no {variant!r} model",
            where=str(bundle_dir / layout.BUNDLE_META),
            fix=f"choose one of {sorted(variants)} (int8 needs export.quantize=true)",
        )
    return variants[variant] if variant else meta.get("model_file", layout.ONNX_FILE)


def ort_threads(requested: int | None, meta: dict) -> int:
    """Intra-op threads: the argument, else $INTENTOPS_ORT_THREADS, else the bundle's setting, else every core."""
    return int(
        requested
        or int(os.environ.get(ORT_THREADS_ENV) or 0)
        or meta.get("session", {}).get("intra_op_num_threads")
        or os.cpu_count()
        or 1
    )


def onnx_session(path: Path, threads: int):
    """An ONNX Runtime CPU session with full graph optimisation and `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if threads > 1:
        # Idle pool threads sleep instead of spinning: on a small host they would take CPU from the
        # HTTP proxy and from the tokeniser between calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
