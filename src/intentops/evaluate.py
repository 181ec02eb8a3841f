"""Stage `evaluate`: score the trained bundle on test through the Predictor; metrics, plots, error analysis."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from intentops.config import load_params
from intentops.errors import UserError, cli_entry
from intentops.io import atomic_path, write_json
from intentops.metrics import classification_summary, expected_calibration_error, reliability_bins
from intentops.train import encode_labels

log = logging.getLogger(__name__)

DIGITS = re.compile(r"\d")
# Currency symbols, amounts ("£20", "20.50", "100 euros") and currency codes mark money-talk utterances.
AMOUNT = re.compile(r"[$£€¥]|\b\d+(?:[.,]\d+)?\s*(?:usd|eur|gbp|euros?|dollars?|pounds?)\b|\b\d+[.,]\d{2}\b", re.I)
LENGTH_BUCKETS = [(0, 5), (6, 10), (11, 20), (21, 40), (41, 10_000)]


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """Per intent: precision, recall, F1, support, false positives and false negatives."""
    idx = np.arange(len(labels))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=idx)
    tp = np.diag(cm)
    return pd.DataFrame({
        "intent": labels, "precision": p, "recall": r, "f1": f, "support": s,
        "false_positives": cm.sum(axis=0) - tp, "false_negatives": cm.sum(axis=1) - tp,
    })


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], texts: list[str],
                   top: int = 10, examples: int = 3) -> list[dict]:
    """The most frequent (true -> predicted) mistakes, each with a few example utterances."""
    wrong = y_true != y_pred
    pairs = pd.DataFrame({"true": y_true[wrong], "pred": y_pred[wrong], "text": np.asarray(texts, dtype=object)[wrong]})
    out = []
    for (t, p), grp in sorted(pairs.groupby(["true", "pred"]), key=lambda kv: (-len(kv[1]), kv[0])):
        out.append({"true": labels[t], "predicted": labels[p], "count": len(grp),
                    "examples": grp["text"].head(examples).tolist()})
        if len(out) == top:
            break
    return out


def slice_metrics(texts: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> list[dict]:
    """Accuracy on slices: word-count buckets, with/without digits, with/without money amounts."""
    words = np.array([len(t.split()) for t in texts])
    has_digit = np.array([bool(DIGITS.search(t)) for t in texts])
    has_amount = np.array([bool(AMOUNT.search(t)) for t in texts])
    correct = y_true == y_pred
    slices = [(f"words {lo}-{hi}" if hi < 10_000 else f"words >{lo - 1}", (words >= lo) & (words <= hi))
              for lo, hi in LENGTH_BUCKETS]
    slices += [("has digits", has_digit), ("no digits", ~has_digit),
               ("has amount", has_amount), ("no amount", ~has_amount)]
    return [{"slice": name, "n": int(m.sum()), "accuracy": float(correct[m].mean()) if m.any() else None}
            for name, m in slices]


def run_evaluate(proba: np.ndarray, y_true: np.ndarray, labels: list[str], texts: list[str],
                 n_bins: int = 15) -> dict:
    """Everything `evaluate` reports, from predicted probabilities (n, k) and true label ids (n,).

    Returns:
        {"metrics", "per_class" (DataFrame), "confusion" (rows for dvc plots), "reliability", "confidence",
         "f1_bars", "pairs", "slices"}
    """
    y_pred = proba.argmax(axis=1)
    conf = proba.max(axis=1)
    summary = classification_summary(y_true, y_pred)
    ece = expected_calibration_error(proba, y_true, n_bins)
    per_class = per_class_report(y_true, y_pred, labels)
    metrics = {"test": {**summary, "ece": ece, "n": int(len(y_true)),
                        "mean_confidence": float(conf.mean()),
                        "worst_class_f1": float(per_class["f1"].min())}}
    return {
        "metrics": metrics,
        "per_class": per_class,
        "confusion": [{"actual": labels[t], "predicted": labels[p]} for t, p in zip(y_true, y_pred, strict=True)],
        "reliability": reliability_bins(proba, y_true, n_bins),
        "confidence": [{"confidence": round(float(c), 4), "correct": bool(ok)} for c, ok in
                       zip(conf, y_pred == y_true, strict=True)],
        "f1_bars": [{"intent": r.intent, "f1": round(float(r.f1), 4)} for r in per_class.itertuples()],
        "pairs": confused_pairs(y_true, y_pred, labels, texts),
        "slices": slice_metrics(texts, y_true, y_pred),
    }


def confidence_histogram(confidence: list[dict], n_bins: int = 20) -> list[dict]:
    """Counts of correct and wrong predictions per confidence bin (a bar chart dvc plots can draw)."""
    conf = np.array([c["confidence"] for c in confidence])
    ok = np.array([c["correct"] for c in confidence])
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = idx == b
        rows.append({"bin": f"{edges[b]:.2f}-{edges[b + 1]:.2f}", "count": int(m.sum()), "correct": int((m & ok).sum()),
                     "wrong": int((m & ~ok).sum())})
    return rows


def error_analysis_markdown(result: dict, point: dict | None = None, top_worst: int = 10) -> str:
    """A readable report: the operating point, most-confused pairs with examples, worst classes, FP vs FN, slices."""
    m = result["metrics"]["test"]
    pc = result["per_class"]
    lines = ["# Error analysis (test split)", "",
             f"Accuracy {m['accuracy']:.4f} · macro-F1 {m['macro_f1']:.4f} · ECE {m['ece']:.4f} · n = {m['n']}", ""]
    if point:
        lines += ["## Operating point (as served: out-of-scope flags count as wrong on in-scope rows)", "",
                  f"Method {point['method']}, threshold {point['threshold']}, temperature {point['temperature']:.3f}: "
                  f"in-scope accuracy {point['in_scope_accuracy']:.4f} on {point['n_in_scope']} rows, coverage "
                  f"{point['coverage']:.4f}" + (f"; OOS recall {point['oos_recall']:.4f} on {point['n_oos']} rows, "
                                               f"AUROC {point['oos_auroc']:.4f}" if point["n_oos"] else "") + ".", ""]
    lines += [
             "## Most-confused pairs", "", "| true | predicted | count | examples |", "|---|---|---|---|"]
    for p in result["pairs"]:
        ex = "<br>".join(e.replace("|", "\\|") for e in p["examples"])
        lines.append(f"| {p['true']} | {p['predicted']} | {p['count']} | {ex} |")
    lines += ["", f"## Worst {top_worst} classes by F1", "",
              "| intent | F1 | precision | recall | FP | FN | support | leans to |", "|---|---|---|---|---|---|---|---|"]
    for r in pc.sort_values(["f1", "intent"]).head(top_worst).itertuples():
        lean = "over-predicted (FP > FN)" if r.false_positives > r.false_negatives else (
            "missed (FN > FP)" if r.false_negatives > r.false_positives else "balanced")
        lines.append(f"| {r.intent} | {r.f1:.3f} | {r.precision:.3f} | {r.recall:.3f} | {r.false_positives} | "
                     f"{r.false_negatives} | {r.support} | {lean} |")
    lines += ["", "## Slices", "", "| slice | n | accuracy |", "|---|---|---|"]
    for s in result["slices"]:
        acc = "–" if s["accuracy"] is None else f"{s['accuracy']:.4f}"
        lines.append(f"| {s['slice']} | {s['n']} | {acc} |")
    lean = pc.assign(net=pc["false_positives"] - pc["false_negatives"])
    lines += ["", "## False positives vs false negatives", "",
              "Each error is a false positive for the predicted intent and a false negative for the true one.",
              "Intents that attract others' examples (FP − FN largest) and that leak theirs (FN − FP largest):", "",
              "| intent | FP | FN | FP − FN |", "|---|---|---|---|"]
    for r in pd.concat([lean.nlargest(5, "net"), lean.nsmallest(5, "net")]).itertuples():
        lines.append(f"| {r.intent} | {r.false_positives} | {r.false_negatives} | {r.net:+d} |")
    lines.append("")
    return "\n".join(lines)


def operating_point(
    predictor, frame: pd.DataFrame, calibration: dict, oos_label: str | None, n_bins: int = 15
) -> tuple[np.ndarray, dict]:
    """The shipped behaviour on a labelled frame: calibrated probabilities, and what `ood.postprocess` flags.

    Every row is scored, out-of-scope ones too (labels the model does not know, or `oos_label`).

    Returns:
        (calibrated probabilities (n, k), metrics: `calibrate.split_metrics` -- in-scope accuracy with flagged
        rows counted wrong, coverage, OOS recall, AUROC and FPR at 95 % TPR -- plus the method and threshold)
    """
    from intentops.calibrate import encode_with_oos, split_metrics
    from intentops.ood import EMBEDDING_METHODS, HIGHER_IS_OOD, postprocess

    texts = frame["text"].tolist()
    ood = calibration.get("ood") or {}
    encode = getattr(predictor.featurizer, "encode", None)  # frozen-encoder models: encode once, use twice
    emb = encode(texts) if encode is not None else None
    if ood.get("method") in EMBEDDING_METHODS and emb is None:
        raise UserError(
            f"out-of-scope method {ood['method']!r} needs sentence embeddings, which model "
            f"{predictor.meta.get('model')!r} does not compute",
            where="params.yaml: calibrate.method",
            fix="calibrate with msp or energy, or train model=minilm_head",
        )
    logits = predictor.logits(texts, embeddings=emb) if emb is not None else predictor.logits(texts)
    out = postprocess(logits, calibration, emb)
    y = encode_with_oos(frame, predictor.labels, oos_label)
    higher = bool(ood.get("higher_is_ood", HIGHER_IS_OOD.get(ood.get("method"), True)))
    oos_index = calibration.get("oos_index")
    m = split_metrics(out, y, y < 0, higher, n_bins, oos_index)
    return out["proba"], {"method": ood.get("method"), "threshold": ood.get("threshold"),
                          "temperature": float(calibration.get("temperature", 1.0)), **m}


@cli_entry
def main() -> None:
    from intentops.io import read_json
    from intentops.ood import load_calibration
    from intentops.predictor import Predictor

    cfg = load_params()
    paths = cfg.paths
    n_bins = int(cfg.evaluate.ece_bins)
    predictor = Predictor.load(paths.model_dir)
    # The `calibrate` stage's fit: evaluate scores what serving will do (temperature, out-of-scope flags).
    calibration = load_calibration(paths.calibration) if Path(paths.calibration).is_file() else {}
    if not calibration:
        log.warning("evaluate: no %s; reporting uncalibrated probabilities and no operating point", paths.calibration)
    oos_label = read_json(paths.taxonomy).get("oos_label") or "oos"
    frame = pd.read_parquet(paths.test)
    log.info("evaluate: predicting %d test utterances through the Predictor", len(frame))
    proba_all, point = operating_point(predictor, frame, calibration, oos_label, n_bins)
    # Classification metrics over the rows whose label the model knows (a trained oos class included).
    test, y_true, kept = encode_labels(frame, predictor.labels)
    texts = test["text"].tolist()
    proba = proba_all[kept]
    result = run_evaluate(proba, y_true, predictor.labels, texts, n_bins)
    metrics = result["metrics"]
    if calibration:
        # In-scope accuracy (flagged rows count as wrong) and OOS recall at the threshold `calibrate` chose.
        metrics["operating_point"] = point
    try:  # the bar to clear, side by side with the model
        metrics["baseline_accuracy"] = read_json(paths.baseline_metrics)["test"]["accuracy"]
    except FileNotFoundError:
        pass

    plots = Path(paths.eval_plots_dir)
    with atomic_path(plots) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "confusion.json", result["confusion"])
        write_json(tmp / "per_class_f1.json", result["f1_bars"])
        write_json(tmp / "reliability.json", result["reliability"])
        write_json(tmp / "confidence.json", confidence_histogram(result["confidence"]))
    write_json(paths.eval_per_class, result["per_class"].to_dict(orient="records"))
    with atomic_path(paths.eval_per_class_csv) as tmp:
        result["per_class"].to_csv(tmp, index=False)
    with atomic_path(paths.error_analysis) as tmp:
        tmp.write_text(error_analysis_markdown(result, metrics.get("operating_point")), encoding="utf-8")
    write_json(paths.eval_metrics, metrics)
    log.info("evaluate: accuracy %.4f, macro-F1 %.4f, ECE %.4f", metrics["test"]["accuracy"],
             metrics["test"]["macro_f1"], metrics["test"]["ece"])
    if calibration:
        log.info("evaluate: operating point (%s, threshold %s): in-scope accuracy %.4f on %d%s", point["method"],
                 point["threshold"], point["in_scope_accuracy"], point["n_in_scope"],
                 f", OOS recall {point['oos_recall']:.4f} on {point['n_oos']}" if point["n_oos"] else "")


if __name__ == "__main__":
    main()
