"""Stage `export`: the trained torch bundle -> one ONNX graph (encoder + pooling + normalisation + head) and a
versioned, self-describing bundle that `Predictor.load` serves, after a parity check against PyTorch.

Bundle layout (paths.bundle_dir):
    bundle.json        format "onnx", version, graph inputs, model variants, ONNX Runtime settings, and
                       "variant_checks": {"int8": {accuracy, fp32_accuracy, drop_pt, max_drop_pt, fit}} (the int8
                       graph's test accuracy loss in points, and whether it is within export.max_int8_drop)
    model.onnx         fp32 graph: input_ids, attention_mask (b, L) int64, tfidf (b, V) float32 -> logits (b, k),
                       embedding (b, 384 per embed.layers entry) (the normalised sentence embedding, for
                       kNN/Mahalanobis out-of-scope)
    model.int8.onnx    the same with MiniLM's weights dynamic int8, the head fp32 (export.quantize; `quantize`)
    tokenizer.json     the encoder's `tokenizers` tokenizer, set to truncate at max_seq_length, pad to the longest
    tfidf.joblib       the fitted sklearn TF-IDF union (sklearn computes it at serving time too)
    labels.json        intent names, index i = logit i
    calibration.json   temperature, out-of-scope method + threshold, review thresholds (models/calibration.json);
                       "variants": {"int8": {temperature, threshold}} fitted on the int8 graph's val outputs,
                       unless fp32's calibration holds for it on val (`int8_calibration`)
    ood_stats.npz      the statistics an embedding out-of-scope method needs (mahalanobis, knn); absent otherwise
    card.json          model card: version, metrics, data hashes, params, git revision, W&B run
    model_card.md      the model card for people (`intentops.inference.model_card`): intended use, data and
                       licence, metrics, calibration, out-of-scope operating point, fp32 vs int8, limitations,
                       how to reproduce; from card.json and the evaluate and calibrate reports
    manifest.json      size and sha256 of every file above (`intentops.inference.bundle.seal`, written last)
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from intentops.config import check_stage_args, load_params
from intentops.errors import UserError, cli_entry
from intentops.inference.bundle import (
    BUNDLE_META,
    CALIBRATION_FILE,
    CARD_FILE,
    INT8_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    ONNX_FILE,
    OOD_STATS_FILE,
    TFIDF_FILE,
    TOKENIZER_FILE,
    content_version,
    file_sha256,
    seal,
)
from intentops.inference.model_card import card_context, render_card
from intentops.inference.ood import (
    EMBEDDING_METHODS,
    load_calibration,
    postprocess,
    refit_calibration,
    softmax,
    split_metrics,
    variant_calibration,
)
from intentops.inference.predictor import OnnxPredictor, Predictor
from intentops.io import atomic_path, read_json, write_json, write_npz
from intentops.metrics import classification_summary
from intentops.models.labels import encode_with_oos, label_ids
from intentops.models.tfidf import strip_process_state
from intentops.timing import latency_ms, progress, timed

log = logging.getLogger(__name__)

EXPORTABLE_MODELS = ("minilm_head",)


def build_graph(predictor: Predictor, encoder):
    """One `nn.Module`: MiniLM -> mean pooling over real tokens -> L2 normalisation -> the trained head.

    With `embed.layers` the pooling covers those hidden states (`intentops.models.encoder.pool_layers`).

    Args:
        predictor: a torch `Predictor` of model `minilm_head` (net = EmbTfidfHead).
        encoder: the SentenceTransformer the featurizer encodes with (Transformer, mean Pooling, Normalize).
    """
    import torch
    from torch import nn

    kinds = [type(m).__name__ for m in encoder]
    pooling = encoder[1].get_config_dict().get("pooling_mode") if len(kinds) > 1 else None
    if kinds[:3] != ["Transformer", "Pooling", "Normalize"] or pooling != "mean":
        raise UserError(
            f"cannot export encoder modules {kinds} (pooling {pooling!r})",
            where="conf/config.yaml: embed.model",
            fix="export supports Transformer + mean Pooling + Normalize encoders such as all-MiniLM-L6-v2",
        )

    from intentops.models.encoder import pool_layers

    layers = getattr(predictor.featurizer, "layers", None) or [-1]

    class EncoderHead(nn.Module):
        def __init__(self, bert: nn.Module, head: nn.Module):
            super().__init__()
            self.bert, self.head = bert, head

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tfidf: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # Token types are all 0 for single sentences, as sentence-transformers feeds them.
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
                output_hidden_states=layers != [-1],
            )
            # (b, L, 384) per layer -> (b, 384 * len(layers)): embed.layers, as the featurizer encodes;
            # [-1] is sentence-transformers' mean + normalise.
            states = hidden.hidden_states if layers != [-1] else (hidden.last_hidden_state,)
            emb = pool_layers(states, attention_mask, layers)
            return self.head(emb, tfidf), emb  # logits (b, k), embedding (b, d)

    return EncoderHead(encoder[0].auto_model, predictor.net).eval()


def export_onnx(graph, path: Path, tfidf_dim: int, opset: int) -> None:
    """Trace `graph` to ONNX with dynamic batch and sequence axes."""
    import torch

    ids = torch.ones(2, 8, dtype=torch.long)
    example = (ids, torch.ones_like(ids), torch.zeros(2, tfidf_dim))
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "tfidf": {0: "batch"},
        "logits": {0: "batch"},
        "embedding": {0: "batch"},
    }
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter: the dynamo one needs onnxscript, which this project does not install.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask", "tfidf"],
            output_names=["logits", "embedding"],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )


# Graph nodes the int8 copy keeps in fp32: the head (EncoderHead.head, traced under "/head/"). Its memory term is
# cos(emb, bank) / 0.01, so an int8 error of 0.005 in a cosine moves a logit by 0.5 (CLINC150 oos-class rows).
FP32_PREFIXES = ("/head/",)


def fp32_nodes(model_path: Path, prefixes: tuple[str, ...] = FP32_PREFIXES) -> list[str]:
    """Names of the graph's nodes under `prefixes` (torch module paths), which quantisation leaves in fp32."""
    import onnx

    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    names = [n.name for n in nodes if n.name.startswith(prefixes)]
    # quantize_dynamic first rewrites a Gemm (the head's linear layer) as MatMul "<name>_MatMul" + Add, and
    # matches nodes_to_exclude against that name.
    return names + [f"{n.name}_MatMul" for n in nodes if n.op_type == "Gemm" and n.name.startswith(prefixes)]


def quantize(src: Path, dst: Path) -> None:
    """The int8 copy: MiniLM's weight MatMuls and token embeddings dynamic int8, per output channel, with 7-bit
    weights; the head (linear layer and nearest-neighbour memory) stays fp32.

    Test accuracy drop vs fp32 in points, seed 42, 2-core AVX2 host (README "int8"), everything 8-bit as before
    -> this: Banking77 0.26 -> 0.03, CLINC150 (+experiment=clinc150_oos, all 5,500 rows) 1.55 -> 0.19, HWU64
    2.32 -> 0.28. The head alone fixes Banking77 and HWU64 but not CLINC150 (3.35): 7-bit weights (reduce_range)
    do, because on CPUs without VNNI ONNX Runtime's u8s8 kernel adds pairs of u8 x s8 products in int16
    (vpmaddubsw), which saturates with 8-bit weights. u8u8 does not saturate either, but ran 1.3x fp32's speed
    where this runs 1.5x.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = fp32_nodes(src)
    root = logging.getLogger()
    level = root.level
    # The quantiser logs every tensor it skips (INFO) and advice on pre-processing (WARNING) on the root logger.
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            nodes_to_exclude=keep,
        )
    finally:
        root.setLevel(level)


def write_tokenizer(encoder_dir: Path, dst: Path, max_seq_length: int) -> None:
    """The encoder's tokenizer.json, set to truncate as the encoder did and to pad to the batch's longest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(encoder_dir / TOKENIZER_FILE))
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length=max_seq_length)
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tok.save(str(dst))


def parity_report(
    reference: np.ndarray, candidate: np.ndarray, min_agreement: float, max_abs_diff: float
) -> dict:
    """Compare two (n, k) probability tables row by row: argmax agreement and largest absolute difference."""
    agree = reference.argmax(1) == candidate.argmax(1)
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    out = {
        "n": int(len(reference)),
        "argmax_agreement": float(agree.mean()) if len(agree) else 1.0,
        "argmax_disagreements": int((~agree).sum()),
        "max_abs_prob_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_prob_diff": float(diff.mean()) if diff.size else 0.0,
        "min_argmax_agreement": min_agreement,
        "max_abs_prob_diff_allowed": max_abs_diff,
    }
    out["passed"] = bool(
        out["argmax_agreement"] >= min_agreement and out["max_abs_prob_diff"] <= max_abs_diff
    )
    return out


def timed_logits(logits, texts: list[str], batch_size: int, single_calls: int) -> tuple[np.ndarray, dict]:
    """Raw logits for `texts`, batched sentences/s, and single-sentence latency (ms, p50/p95) after warm-up."""
    logits(texts[:batch_size], batch_size=batch_size)
    out, batched_s = timed(logits, texts, batch_size=batch_size)
    single = latency_ms(lambda text: logits([text], batch_size=1), texts, single_calls, warmup=5)
    return out, {
        "sentences_per_s": round(len(texts) / batched_s, 1),
        "single_ms_p50": round(single["p50_ms"], 2),
        "single_ms_p95": round(single["p95_ms"], 2),
    }


def scores(logits: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy and macro-F1 of the argmax over the rows of a known label (y >= 0), rounded to 4 places."""
    known = y >= 0
    return {
        k: round(float(v), 4) for k, v in classification_summary(y[known], logits[known].argmax(1)).items()
    }


def write_bundle(
    predictor: Predictor,
    encoder,
    encoder_dir: Path,
    out: Path,
    opset: int,
    quantize_int8: bool,
    calibration: dict | None,
    ood_stats: dict[str, np.ndarray] | None,
    session: dict | None,
) -> float:
    """Trace the graph (and its int8 copy) and write every bundle file into `out`; returns the seconds it took.

    bundle.json has no version yet: measuring the graphs adds to it and to calibration.json (`finish_bundle`).
    """
    import joblib

    out.mkdir(parents=True, exist_ok=True)
    graph = build_graph(predictor, encoder)
    _, export_s = timed(
        export_onnx, graph, out / ONNX_FILE, int(predictor.meta["net_kwargs"]["tfidf_dim"]), opset
    )
    variants = {"fp32": ONNX_FILE}
    if quantize_int8:
        export_s += timed(quantize, out / ONNX_FILE, out / INT8_FILE)[1]
        variants["int8"] = INT8_FILE
    write_tokenizer(encoder_dir, out / TOKENIZER_FILE, int(encoder.max_seq_length))
    strip_process_state(predictor.featurizer.vectorizer)  # same fit, same bytes
    joblib.dump(predictor.featurizer.vectorizer, out / TFIDF_FILE)
    write_json(out / LABELS_FILE, predictor.labels)
    write_json(out / CALIBRATION_FILE, calibration or {"temperature": 1.0, "ood": {}})
    if ood_stats:
        write_npz(out / OOD_STATS_FILE, ood_stats)
    meta = {
        "format": "onnx",
        "model": predictor.meta.get("model"),
        "model_file": ONNX_FILE,
        "variants": variants,
        "inputs": ["input_ids", "attention_mask", "tfidf"],
        "outputs": ["logits", "embedding"],
        "opset": opset,
        "max_seq_length": int(encoder.max_seq_length),
        "session": session or {},
    }
    write_json(out / BUNDLE_META, meta)
    return export_s


def measure_bundle(
    reference: Predictor,
    out: Path,
    texts: list[str],
    y: np.ndarray,
    batch_size: int,
    latency_calls: int,
    min_agreement: float,
    max_abs_diff: float,
) -> tuple[dict, dict, dict]:
    """Parity of the bundle's fp32 graph with `reference` (the torch predictor under the same calibration),
    and accuracy, speed and size of each graph variant.

    Returns:
        (parity, {"torch", "fp32"[, "int8"]} metrics, {variant: (its OnnxPredictor, test logits (n, k))})
    """
    temperature = float(reference.calibration.get("temperature", 1.0))
    predictors = {"torch": reference, "fp32": OnnxPredictor.from_bundle(out)}
    if (out / INT8_FILE).is_file():
        predictors["int8"] = OnnxPredictor.from_bundle(out, variant="int8")
    timings = {}
    # One step per graph (minutes on 2 cores, torch the slowest); the postfix names the graph being timed.
    for name in (bar := progress(predictors, "export parity", unit="graph")):
        bar.set_postfix_str(name)
        timings[name] = timed_logits(predictors[name].logits, texts, batch_size, latency_calls)
    (ref, ref_t), (got, got_t) = timings["torch"], timings["fp32"]
    parity = parity_report(softmax(ref, temperature), softmax(got, temperature), min_agreement, max_abs_diff)
    metrics = {
        "torch": {**scores(ref, y), **ref_t},
        "fp32": {**scores(got, y), **got_t, "bytes": (out / ONNX_FILE).stat().st_size},
    }
    graphs = {"fp32": (predictors["fp32"], got)}
    if "int8" in predictors:
        q, q_t = timings["int8"]
        metrics["int8"] = {
            **scores(q, y),
            **q_t,
            "bytes": (out / INT8_FILE).stat().st_size,
            "argmax_agreement_with_fp32": round(float((q.argmax(1) == got.argmax(1)).mean()), 4),
            "max_abs_prob_diff_vs_fp32": round(
                float(np.abs(softmax(q, temperature) - softmax(got, temperature)).max()), 4
            ),
        }
        graphs["int8"] = (predictors["int8"], q)
    return parity, metrics, graphs


def variant_check(fp32_accuracy: float, accuracy: float, max_drop_pt: float) -> dict:
    """bundle.json's check of a graph variant: its test accuracy loss against fp32, in points, and whether that
    is within `max_drop_pt` (export.max_int8_drop); serving reads exactly these keys."""
    drop = round((fp32_accuracy - accuracy) * 100, 2)
    return {
        "accuracy": accuracy,
        "fp32_accuracy": fp32_accuracy,
        "drop_pt": drop,
        "max_drop_pt": float(max_drop_pt),
        "fit": bool(drop <= max_drop_pt),
    }


def calibration_report(logits: np.ndarray, y: np.ndarray, calibration: dict, n_bins: int) -> dict:
    """A graph's test rows under `calibration`: temperature, threshold, ECE, in-scope accuracy and coverage,
    and OOS recall where test has out-of-scope rows (y == -1) and the calibration a logit out-of-scope method
    (an embedding method's flags would need the test embeddings, which export does not fetch)."""
    ood = calibration.get("ood") or {}
    if ood.get("method") in EMBEDDING_METHODS:
        calibration = {**calibration, "ood": {}}
    if not (calibration.get("ood") or {}).get("method"):  # nothing flags out-of-scope: in-scope rows only
        logits, y = logits[y >= 0], y[y >= 0]
    out = postprocess(logits, calibration, None)
    m = split_metrics(
        out, y, y < 0, bool(ood.get("higher_is_ood", True)), n_bins, calibration.get("oos_index")
    )
    keep = ("ece", "in_scope_accuracy", "coverage", "oos_recall")
    return {
        "temperature": round(float(calibration.get("temperature", 1.0)), 4),
        "threshold": None if ood.get("threshold") is None else round(float(ood["threshold"]), 4),
        **{k: round(float(m[k]), 4) for k in keep if k in m},
    }


# How far the int8 graph may sit from the fp32 graph, on val, under fp32's calibration, for that calibration to
# still hold for it: ECE at most this much higher; coverage and OOS recall within this much (1 pt).
CALIBRATION_HOLDS_WITHIN = 0.01


def fp32_calibration_holds(fp32_val: dict, int8_val: dict) -> bool:
    """True when the int8 graph under fp32's calibration (`calibration_report` on val) behaves as fp32 does."""
    if int8_val["ece"] > fp32_val["ece"] + CALIBRATION_HOLDS_WITHIN:
        return False
    shared = [k for k in ("coverage", "oos_recall") if k in fp32_val and k in int8_val]
    return all(abs(int8_val[k] - fp32_val[k]) <= CALIBRATION_HOLDS_WITHIN for k in shared)


def int8_calibration(
    fp32: OnnxPredictor,
    int8: OnnxPredictor,
    val_texts: list[str],
    val_y: np.ndarray,
    batch_size: int,
    ece_bins: int,
) -> tuple[dict, dict]:
    """The int8 graph's own temperature and threshold, unless fp32's hold for it on val; with the val check.

    The int8 graph's val outputs are computed once, for the check and for the refit.

    Returns:
        ({} when fp32's calibration holds (serving applies it) or there is no val, else `ood.refit_calibration`
        on the int8 graph's val outputs; the check: both graphs' val reports under fp32's calibration and
        whether it holds ({} without val)).
    """
    if not len(val_texts):
        return {}, {}
    need = (int8.calibration.get("ood") or {}).get("method") in EMBEDDING_METHODS
    int8_logits, int8_emb = int8.outputs(val_texts, need, batch_size=batch_size)
    fp32_logits = fp32.logits(val_texts, batch_size=batch_size)
    fp32_val, int8_val = (
        calibration_report(logits, val_y, fp32.calibration, ece_bins) for logits in (fp32_logits, int8_logits)
    )
    holds = fp32_calibration_holds(fp32_val, int8_val)
    check = {"fp32_on_val": fp32_val, "int8_under_fp32_on_val": int8_val, "fp32_calibration_holds": holds}
    if not holds and fp32.calibration.get("fitted_on") == "crossfit":
        # A small val (train.crossfit) that, with train.crossfit.refit, also trained the model: no refit on it.
        check["refit"] = (
            "skipped: fp32's calibration was fitted on cross-fitted rows, val is too small to refit on"
        )
        return {}, check
    own = {} if holds else refit_calibration(int8.calibration, int8_logits, val_y, int8_emb)
    return own, check


def finish_bundle(
    out: Path,
    graphs: dict,
    metrics: dict,
    test_y: np.ndarray,
    val_texts: list[str],
    val_y: np.ndarray,
    batch_size: int,
    max_int8_drop: float,
    ece_bins: int,
) -> str:
    """After measuring: the int8 graph's own calibration into calibration.json, its accuracy check into
    bundle.json, each graph's calibration report into `metrics`; returns the bundle's content version.

    Args:
        graphs: `measure_bundle`'s {variant: (OnnxPredictor, test logits)}.
        test_y, val_y: label ids with −1 for out-of-scope rows (`encode_with_oos`).
    """
    fp32, fp32_logits = graphs["fp32"]
    metrics["fp32"]["calibration"] = calibration_report(fp32_logits, test_y, fp32.calibration, ece_bins)
    if "int8" in graphs:
        int8, int8_logits = graphs["int8"]
        own, metrics["int8"]["calibration_check_val"] = int8_calibration(
            fp32, int8, val_texts, val_y, batch_size, ece_bins
        )
        raw = read_json(out / CALIBRATION_FILE)
        if own:
            write_json(out / CALIBRATION_FILE, {**raw, "variants": {"int8": own}})
        int8_cal = variant_calibration({**fp32.calibration, "variants": {"int8": own}}, "int8")
        metrics["int8"]["calibration"] = calibration_report(int8_logits, test_y, int8_cal, ece_bins)
        # The check that fp32's calibration would (not) have done: the same graph under fp32's temperature and threshold.
        metrics["int8"]["calibration_fp32"] = calibration_report(
            int8_logits, test_y, fp32.calibration, ece_bins
        )
        checks = {
            "int8": variant_check(metrics["fp32"]["accuracy"], metrics["int8"]["accuracy"], max_int8_drop)
        }
        write_json(out / BUNDLE_META, {**read_json(out / BUNDLE_META), "variant_checks": checks})
    return content_version(out)


def run_export(
    predictor: Predictor,
    encoder,
    encoder_dir: Path,
    out: Path,
    texts: list[str],
    y: np.ndarray,
    test_y_oos: np.ndarray | None = None,
    val_texts: list[str] = (),
    val_y_oos: np.ndarray | None = None,
    opset: int = 17,
    quantize_int8: bool = True,
    calibration: dict | None = None,
    ood_stats: dict[str, np.ndarray] | None = None,
    session: dict | None = None,
    batch_size: int = 64,
    latency_calls: int = 100,
    min_agreement: float = 0.999,
    max_abs_diff: float = 1e-4,
    max_int8_drop: float = 0.5,
    ece_bins: int = 15,
) -> dict:
    """Write the ONNX bundle into the new folder `out`, check its parity with `predictor` and time it.

    Args:
        predictor: the trained torch Predictor (model minilm_head).
        encoder: its SentenceTransformer, loaded from `encoder_dir` with the featurizer's max_seq_length.
        texts, y: the test split and its label ids (in predictor.labels order; −1 for a label it lacks).
        test_y_oos, val_texts, val_y_oos: test's label ids with −1 for out-of-scope rows, and val's texts and
            ids the same way (the int8 graph's calibration is fitted on val); default: `y`, no val.
        calibration, ood_stats: what `bundle_calibration` returns (calibration.json and ood_stats.npz).
        max_int8_drop: the most test accuracy, in points, the int8 graph may lose and still be fit to serve.

    Returns:
        {"version", "parity", "metrics"}; the card is left to the caller (it needs paths and config).
    """
    export_s = write_bundle(
        predictor, encoder, encoder_dir, out, opset, quantize_int8, calibration, ood_stats, session
    )
    # Parity under one calibration: the torch model with the bundle's, so both sides mean the same probabilities.
    reference = predictor.with_calibration(calibration or {})
    parity, measured, graphs = measure_bundle(
        reference, out, texts, y, batch_size, latency_calls, min_agreement, max_abs_diff
    )
    version = finish_bundle(
        out,
        graphs,
        measured,
        y if test_y_oos is None else test_y_oos,
        list(val_texts),
        np.zeros(0, dtype=np.int64) if val_y_oos is None else val_y_oos,
        batch_size,
        max_int8_drop,
        ece_bins,
    )
    metrics = {"version": version, "n_test": len(texts), "export_seconds": round(export_s, 1), **measured}
    return {"version": version, "parity": parity, "metrics": metrics}


def git_revision(cwd: str | os.PathLike = ".") -> str:
    """`git rev-parse HEAD`, with "+dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def read_calibration(model_dir: Path, meta: dict) -> dict:
    """The fitted temperature from the train bundle (calibration.json or bundle.json), else 1.0."""
    path = model_dir / CALIBRATION_FILE
    fitted = read_json(path) if path.is_file() else meta.get("calibration", {})
    return {"temperature": float(fitted.get("temperature", meta.get("temperature", 1.0)))}


def bundle_calibration(fitted: dict, train_temperature: float, review_defaults: dict) -> tuple[dict, dict]:
    """The bundle's calibration.json and out-of-scope statistics from the `calibrate` stage's fit.

    Args:
        fitted: `ood.load_calibration(models/calibration.json)` (arrays under ood.stats), or {} without one.
        train_temperature: the train bundle's temperature, used when nothing was fitted.
        review_defaults: min_confidence and min_margin (export params) for a fit without review thresholds.

    Returns:
        (calibration in `ood.postprocess`'s shape, {name: array} for ood_stats.npz; empty for logit methods)
    """
    ood = dict(fitted.get("ood") or {})
    stats = ood.pop("stats", None) or {}
    ood.pop("stats_file", None)
    if stats:
        ood["stats_file"] = OOD_STATS_FILE
    review = fitted.get("review") or {}
    calibration = {
        "temperature": float(fitted.get("temperature", train_temperature)),
        "ood": ood,
        "review": {k: float(review.get(k, review_defaults[k])) for k in ("min_confidence", "min_margin")},
        "oos_label": fitted.get("oos_label"),
        # The trained out-of-scope class's logit column (split.oos_as_class): without it serving would neither
        # flag its top-1s nor leave it out of the score the threshold was fitted on.
        "oos_index": fitted.get("oos_index"),
    }
    return calibration, stats


def card_calibration(calibration: dict) -> dict:
    """What the model card says about calibration and out-of-scope detection (no arrays)."""
    ood = calibration.get("ood") or {}
    return {
        "temperature": calibration.get("temperature", 1.0),
        "out_of_scope": {
            k: ood[k] for k in ("method", "threshold", "higher_is_ood", "target", "k") if k in ood
        }
        | {"stats_file": ood.get("stats_file")},
        "review": calibration.get("review", {}),
        "oos_label": calibration.get("oos_label"),
        "reasons": "out_of_distribution (the out-of-scope score is past the threshold), else low_confidence "
        "(calibrated top-1 < review.min_confidence), else ambiguous (top1 - top2 < review.min_margin)",
    }


def build_card(
    version: str,
    reports: dict[str, dict | None],
    export_result: dict,
    data_sha256: dict[str, str],
    params: dict,
    git_rev: str,
    calibration: dict | None = None,
) -> dict:
    """The model card: what was exported, from which data, code and config, and how well it does.

    Only what the inputs decide: no time, path, speed or run id (the bundle is a DVC output, and its version
    names its content), so the same inputs give the same card on any machine.

    Args:
        reports: the train and eval metrics json (None when a report is missing).
        calibration: the bundle's calibration.json (temperature, out-of-scope method and threshold, review).
    """
    train, evaluate = reports.get("train") or {}, reports.get("eval") or {}
    m = export_result["metrics"]
    return {
        "version": version,
        "model": train.get("model") or params.get("model", {}).get("name"),
        "calibration": card_calibration(calibration or {}),
        "metrics": {
            "train": {k: train[k] for k in ("val", "test", "size") if k in train},
            "eval": evaluate.get("test", {}),
            # Speeds are facts of this machine: reports/export/metrics.json has them, not the bundle.
            "export": {
                v: {k: m[v][k] for k in ("accuracy", "macro_f1") if k in m[v]}
                for v in ("fp32", "int8")
                if v in m
            },
            "parity": {k: export_result["parity"][k] for k in ("argmax_agreement", "max_abs_prob_diff")},
        },
        "data": {"sha256": data_sha256},
        "params": params,
        "git_revision": git_rev,
    }


def card_files(paths) -> tuple[dict[str, int], dict[str, str]]:
    """Rows per split, and the sha256 of each input file that decides the bundle (the splits, the trained
    model's manifest, calibrate's fit), by path: what model_card.md lists to reproduce it."""
    import pyarrow.parquet as pq

    splits = {s: paths[s] for s in ("train", "val", "test") if Path(paths[s]).is_file()}
    model = Path(paths.model_dir) / MANIFEST_FILE
    files = [*splits.values(), model, paths.calibration, paths.calibration_stats]
    sha = {str(f): file_sha256(f) for f in files if Path(f).is_file()}
    return {s: pq.read_metadata(f).num_rows for s, f in splits.items()}, sha


def write_model_card(
    out: Path, card: dict, reports: dict, result: dict, n_intents: int, files: tuple[dict, dict]
) -> None:
    """Render model_card.md into the bundle `out` from card.json's facts, the stage reports and export's result.

    Args:
        reports: {name: loaded report or None} (train, eval, per_class, errors, calibrate).
        files: `card_files`' (rows per split, {input path: sha256}).
    """
    check = (read_json(out / BUNDLE_META).get("variant_checks") or {}).get("int8")
    measured = {"export": result["metrics"], "parity": result["parity"], "variant_check": check}
    context = card_context(card, {**reports, **measured}, files[0], n_intents, files[1])
    (out / MODEL_CARD_FILE).write_text(render_card(context), encoding="utf-8")


def export_inputs(cfg) -> dict:
    """The trained predictor, its encoder, the test split and the calibration the bundle will carry."""
    from intentops.models.encoder import load_encoder, resolve_encoder

    paths, ecfg = cfg.paths, cfg.export
    model_dir = Path(paths.model_dir)
    predictor = Predictor.load(model_dir)
    model = predictor.meta.get("model")
    if model not in EXPORTABLE_MODELS:
        raise UserError(
            f"export does not support model {model!r} yet",
            where=str(model_dir / BUNDLE_META),
            fix=f"train one of {list(EXPORTABLE_MODELS)} (model=minilm_head is the default)",
        )
    featurizer = predictor.featurizer
    encoder = load_encoder(featurizer.encoder_name)
    if featurizer.max_seq_length:
        encoder.max_seq_length = int(featurizer.max_seq_length)
    test, val = pd.read_parquet(paths.test), pd.read_parquet(paths.val)
    # The `calibrate` stage's fit (temperature, out-of-scope method and threshold, review thresholds) wins over
    # the train bundle's temperature and export's review defaults.
    fitted = load_calibration(paths.calibration) if Path(paths.calibration).is_file() else {}
    calibration, ood_stats = bundle_calibration(
        fitted,
        read_calibration(model_dir, predictor.meta)["temperature"],
        {"min_confidence": ecfg.min_confidence, "min_margin": ecfg.min_margin},
    )
    oos_label = calibration.get("oos_label")
    return {
        "predictor": predictor,
        "encoder": encoder,
        "encoder_dir": Path(resolve_encoder(featurizer.encoder_name)),
        "texts": test["text"].tolist(),
        # Accuracy counts the rows of a label the model knows (a trained oos class included); calibration
        # reports and the int8 graph's own fit count out-of-scope rows as −1, as `calibrate` does.
        "y": label_ids(test["label"], predictor.labels),
        "test_y_oos": encode_with_oos(test, predictor.labels, oos_label),
        "val_texts": val["text"].tolist(),
        "val_y_oos": encode_with_oos(val, predictor.labels, oos_label),
        "calibration": calibration,
        "ood_stats": ood_stats,
    }


def check_parity(parity: dict, where: str) -> None:
    """Raise when the ONNX graph does not match PyTorch (inside `atomic_path`: the old bundle stays)."""
    if parity["passed"]:
        return
    raise UserError(
        f"ONNX/PyTorch parity failed: argmax agreement {parity['argmax_agreement']:.5f} "
        f"(need >= {parity['min_argmax_agreement']}), max |Δp| {parity['max_abs_prob_diff']:.2e} "
        f"(allowed {parity['max_abs_prob_diff_allowed']:.0e})",
        where=where,
        fix="check the graph in intentops.stages.export.build_graph against the featurizer (pooling, max_seq_length)",
    )


def log_summary(result: dict) -> None:
    """One log line: version, parity, and accuracy and speed of each graph."""
    m, parity = result["metrics"], result["parity"]
    log.info(
        "export %s: parity argmax %.5f, max |Δp| %.2e; fp32 acc %.4f %.0f sent/s %.1f ms single%s",
        result["version"],
        parity["argmax_agreement"],
        parity["max_abs_prob_diff"],
        m["fp32"]["accuracy"],
        m["fp32"]["sentences_per_s"],
        m["fp32"]["single_ms_p50"],
        f"; int8 acc {m['int8']['accuracy']:.4f} {m['int8']['sentences_per_s']:.0f} sent/s "
        f"{m['int8']['single_ms_p50']:.1f} ms single"
        if "int8" in m
        else "",
    )


@cli_entry
def main() -> None:
    cfg = load_params()
    paths, ecfg = cfg.paths, cfg.export
    inputs = export_inputs(cfg)
    threads = int(ecfg.intra_op_num_threads or os.cpu_count() or 1)
    reports = {
        name: (read_json(p) if Path(p).is_file() else None)
        for name, p in (
            ("train", paths.train_metrics),
            ("eval", paths.eval_metrics),
            ("per_class", paths.eval_per_class),
            ("errors", paths.error_analysis_data),
            ("calibrate", paths.calibrate_metrics),
        )
    }
    data_sha = {s: file_sha256(paths[s]) for s in ("train", "val", "test") if Path(paths[s]).is_file()}
    with atomic_path(paths.bundle_dir) as tmp:
        result = run_export(
            out=tmp,
            opset=int(ecfg.opset),
            quantize_int8=bool(ecfg.quantize),
            session={"intra_op_num_threads": threads},
            batch_size=int(ecfg.batch_size),
            latency_calls=int(ecfg.latency_calls),
            min_agreement=float(ecfg.parity_min_argmax_agreement),
            max_abs_diff=float(ecfg.parity_max_abs_prob_diff),
            max_int8_drop=float(ecfg.max_int8_drop),
            ece_bins=int(ecfg.ece_bins),
            **inputs,
        )
        card = build_card(
            result["version"],
            reports,
            result,
            data_sha,
            OmegaConf.to_container(cfg, resolve=True),
            git_revision(),
            inputs["calibration"],
        )
        write_json(tmp / CARD_FILE, card)
        write_model_card(tmp, card, reports, result, len(inputs["predictor"].labels), card_files(paths))
        write_json(paths.export_parity, {"version": result["version"], **result["parity"]})
        check_parity(
            result["parity"], str(paths.export_parity)
        )  # leaving the `with` by an error keeps the old bundle
        # Last: the manifest covers every file written above (serving and the registry verify it before loading).
        seal(tmp)
    # Timings on a shared machine: record what else was running so that numbers can be compared honestly.
    result["metrics"]["cpu"] = {
        "count": os.cpu_count(),
        "ort_threads": threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    write_json(paths.export_metrics, result["metrics"])
    log_summary(result)


if __name__ == "__main__":
    check_stage_args("export", __doc__)  # --help, or exit 2 on any argument
    main()
