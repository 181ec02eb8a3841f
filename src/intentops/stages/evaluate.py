"""Stage `evaluate`: score the trained bundle on test through the Predictor; metrics, plots, error analysis."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from intentops.config import check_stage_args, load_params
from intentops.data.taxonomy import Taxonomy
from intentops.data.text import has_amount, has_digits
from intentops.errors import cli_entry
from intentops.inference.ood import HIGHER_IS_OOD, split_metrics
from intentops.io import atomic_path, read_json, write_json
from intentops.metrics import classification_summary, expected_calibration_error, reliability_bins
from intentops.models.labels import encode_labels, encode_with_oos

log = logging.getLogger(__name__)

LENGTH_BUCKETS = [(0, 5), (6, 10), (11, 20), (21, 40), (41, 10_000)]


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """Per intent: precision, recall, F1, support, false positives and false negatives."""
    idx = np.arange(len(labels))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=idx)
    tp = np.diag(cm)
    return pd.DataFrame(
        {
            "intent": labels,
            "precision": p,
            "recall": r,
            "f1": f,
            "support": s,
            "false_positives": cm.sum(axis=0) - tp,
            "false_negatives": cm.sum(axis=1) - tp,
        }
    )


def normalised_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """The (k, k) confusion matrix with each row divided by its support: row i says where intent i's rows went,
    and its diagonal entry is intent i's recall (a row without test rows stays 0)."""
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.float64)
    support = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)


def confusion_figure(matrix: np.ndarray, labels: list[str], title: str):
    """A heatmap of `normalised_confusion` (rows: actual intent, columns: predicted), sized so that 77 or 150
    intents keep readable tick labels, where DVC's confusion template is not."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    k = len(labels)
    side = max(6.0, 0.12 * k + 2.5)  # inches: ~0.12 per intent leaves room for a 6 pt label
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    # A square-root colour scale: a 5 % confusion shows next to a 95 % recall.
    image = ax.imshow(matrix, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    ax.set_yticks(ticks, labels, fontsize=6)
    ax.set_xlabel("predicted intent")
    ax.set_ylabel("actual intent")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.5, label="share of the actual intent's rows (diagonal: recall)")
    return fig


def confused_pairs(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    labels: list[str],
    texts: list[str],
    top: int = 10,
    examples: int = 3,
) -> list[dict]:
    """The most frequent (true -> predicted) mistakes, each with a few example utterances."""
    wrong = y_true != y_pred
    pairs = pd.DataFrame(
        {"true": y_true[wrong], "pred": y_pred[wrong], "text": np.asarray(texts, dtype=object)[wrong]}
    )
    out = []
    for (t, p), grp in sorted(pairs.groupby(["true", "pred"]), key=lambda kv: (-len(kv[1]), kv[0])):
        out.append(
            {
                "true": labels[t],
                "predicted": labels[p],
                "count": len(grp),
                "examples": grp["text"].head(examples).tolist(),
            }
        )
        if len(out) == top:
            break
    return out


def slice_metrics(texts: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> list[dict]:
    """Accuracy on slices: word-count buckets, with/without digits, with/without money amounts."""
    words = np.array([len(t.split()) for t in texts])
    digit = np.array([has_digits(t) for t in texts])
    amount = np.array([has_amount(t) for t in texts])
    correct = y_true == y_pred
    slices = [
        (f"words {lo}-{hi}" if hi < 10_000 else f"words >{lo - 1}", (words >= lo) & (words <= hi))
        for lo, hi in LENGTH_BUCKETS
    ]
    slices += [("has digits", digit), ("no digits", ~digit), ("has amount", amount), ("no amount", ~amount)]
    return [
        {"slice": name, "n": int(m.sum()), "accuracy": float(correct[m].mean()) if m.any() else None}
        for name, m in slices
    ]


def run_evaluate(
    proba: np.ndarray, y_true: np.ndarray, labels: list[str], texts: list[str], n_bins: int = 15
) -> dict:
    """Everything `evaluate` reports, from predicted probabilities (n, k) and true label ids (n,).

    Returns:
        {"metrics", "per_class" (DataFrame), "confusion" (rows for dvc plots), "confusion_normalised" ((k, k)
         array, `normalised_confusion`), "reliability", "confidence", "f1_bars", "pairs", "slices"}
    """
    y_pred = proba.argmax(axis=1)
    conf = proba.max(axis=1)
    summary = classification_summary(y_true, y_pred)
    ece = expected_calibration_error(proba, y_true, n_bins)
    per_class = per_class_report(y_true, y_pred, labels)
    metrics = {
        "test": {
            **summary,
            "ece": ece,
            "n": int(len(y_true)),
            "mean_confidence": float(conf.mean()),
            "worst_class_f1": float(per_class["f1"].min()),
        }
    }
    return {
        "metrics": metrics,
        "per_class": per_class,
        "confusion": [
            {"actual": labels[t], "predicted": labels[p]} for t, p in zip(y_true, y_pred, strict=True)
        ],
        "confusion_normalised": normalised_confusion(y_true, y_pred, len(labels)),
        "reliability": reliability_bins(proba, y_true, n_bins),
        "confidence": [
            {"confidence": round(float(c), 4), "correct": bool(ok)}
            for c, ok in zip(conf, y_pred == y_true, strict=True)
        ],
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
        rows.append(
            {
                "bin": f"{edges[b]:.2f}-{edges[b + 1]:.2f}",
                "count": int(m.sum()),
                "correct": int((m & ok).sum()),
                "wrong": int((m & ~ok).sum()),
            }
        )
    return rows


def error_analysis_markdown(result: dict, point: dict | None = None, top_worst: int = 10) -> str:
    """A readable report: the operating point, most-confused pairs with examples, worst classes, FP vs FN, slices."""
    m = result["metrics"]["test"]
    lines = [
        "# Error analysis (test split)",
        "",
        f"Accuracy {m['accuracy']:.4f} · macro-F1 {m['macro_f1']:.4f} · ECE {m['ece']:.4f} · n = {m['n']}",
        "",
    ]
    if point:
        lines += operating_point_section(point)
    lines += ["## Most-confused pairs", "", "| true | predicted | count | examples |", "|---|---|---|---|"]
    for p in result["pairs"]:
        ex = "<br>".join(e.replace("|", "\\|") for e in p["examples"])
        lines.append(f"| {p['true']} | {p['predicted']} | {p['count']} | {ex} |")
    lines += worst_classes_section(result["per_class"], top_worst)
    lines += ["", "## Slices", "", "| slice | n | accuracy |", "|---|---|---|"]
    for s in result["slices"]:
        acc = "–" if s["accuracy"] is None else f"{s['accuracy']:.4f}"
        lines.append(f"| {s['slice']} | {s['n']} | {acc} |")
    lines += leaning_section(result["per_class"])
    lines.append("")
    return "\n".join(lines)


def operating_point_section(point: dict) -> list[str]:
    """The report's lines on the operating point: method, threshold, in-scope accuracy, coverage, OOS recall."""
    oos = (
        f"; OOS recall {point['oos_recall']:.4f} on {point['n_oos']} rows, AUROC {point['oos_auroc']:.4f}"
        if point["n_oos"]
        else ""
    )
    return [
        "## Operating point (as served: out-of-scope flags count as wrong on in-scope rows)",
        "",
        f"Method {point['method']}, threshold {point['threshold']}, temperature {point['temperature']:.3f}: "
        f"in-scope accuracy {point['in_scope_accuracy']:.4f} on {point['n_in_scope']} rows, coverage "
        f"{point['coverage']:.4f}{oos}.",
        "",
    ]


def worst_classes_section(pc: pd.DataFrame, top_worst: int) -> list[str]:
    """The report's table of the `top_worst` classes by F1, with the side each leans to."""
    lines = [
        "",
        f"## Worst {top_worst} classes by F1",
        "",
        "| intent | F1 | precision | recall | FP | FN | support | leans to |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in pc.sort_values(["f1", "intent"]).head(top_worst).itertuples():
        lean = (
            "over-predicted (FP > FN)"
            if r.false_positives > r.false_negatives
            else ("missed (FN > FP)" if r.false_negatives > r.false_positives else "balanced")
        )
        lines.append(
            f"| {r.intent} | {r.f1:.3f} | {r.precision:.3f} | {r.recall:.3f} | {r.false_positives} | "
            f"{r.false_negatives} | {r.support} | {lean} |"
        )
    return lines


def leaning_section(pc: pd.DataFrame) -> list[str]:
    """The report's table of the intents that attract others' examples most, and that leak theirs most."""
    lean = pc.assign(net=pc["false_positives"] - pc["false_negatives"])
    lines = [
        "",
        "## False positives vs false negatives",
        "",
        "Each error is a false positive for the predicted intent and a false negative for the true one.",
        "Intents that attract others' examples (FP − FN largest) and that leak theirs (FN − FP largest):",
        "",
        "| intent | FP | FN | FP − FN |",
        "|---|---|---|---|",
    ]
    for r in pd.concat([lean.nlargest(5, "net"), lean.nsmallest(5, "net")]).itertuples():
        lines.append(f"| {r.intent} | {r.false_positives} | {r.false_negatives} | {r.net:+d} |")
    return lines


def operating_point(
    predictor, frame: pd.DataFrame, oos_label: str | None, n_bins: int = 15
) -> tuple[np.ndarray, dict]:
    """The shipped behaviour on a labelled frame: `Predictor.score` under the predictor's calibration.

    Every row is scored, out-of-scope ones too (labels the model does not know, or `oos_label`).

    Returns:
        (calibrated probabilities (n, k), metrics: `ood.split_metrics` -- in-scope accuracy with flagged rows
        counted wrong, coverage, OOS recall, AUROC and FPR at 95 % TPR -- plus the method and threshold)
    """
    calibration = predictor.calibration
    ood = calibration.get("ood") or {}
    out = predictor.score(frame["text"].tolist())
    y = encode_with_oos(frame, predictor.labels, oos_label)
    higher = bool(ood.get("higher_is_ood", HIGHER_IS_OOD.get(ood.get("method"), True)))
    m = split_metrics(out, y, y < 0, higher, n_bins, calibration.get("oos_index"))
    return out["proba"], {
        "method": ood.get("method"),
        "threshold": ood.get("threshold"),
        "temperature": float(calibration.get("temperature", 1.0)),
        **m,
    }


def write_reports(paths, result: dict, metrics: dict, dataset: str = "") -> None:
    """The DVC plots, per-class tables, error analysis and metrics, each written atomically; `dataset` (data.name)
    goes into the titles of the plots drawn here."""
    with atomic_path(Path(paths.eval_plots_dir)) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "confusion.json", result["confusion"])
        where = f"test, {dataset}" if dataset else "test"
        title = f"Confusion matrix, rows normalised: recall on the diagonal ({where})"
        figure = confusion_figure(result["confusion_normalised"], list(result["per_class"]["intent"]), title)
        figure.savefig(tmp / "confusion_normalised.png", format="png", dpi=100)
        write_json(tmp / "per_class_f1.json", result["f1_bars"])
        write_json(tmp / "reliability.json", result["reliability"])
        write_json(tmp / "confidence.json", confidence_histogram(result["confidence"]))
    write_json(paths.eval_per_class, result["per_class"].to_dict(orient="records"))
    with atomic_path(paths.eval_per_class_csv) as tmp:
        result["per_class"].to_csv(tmp, index=False)
    with atomic_path(paths.error_analysis) as tmp:
        tmp.write_text(error_analysis_markdown(result, metrics.get("operating_point")), encoding="utf-8")
    write_json(paths.error_analysis_data, {"pairs": result["pairs"], "slices": result["slices"]})
    write_json(paths.eval_metrics, metrics)


def log_summary(metrics: dict) -> None:
    """Log the test metrics and, with a calibration, the operating point."""
    t = metrics["test"]
    log.info("evaluate: accuracy %.4f, macro-F1 %.4f, ECE %.4f", t["accuracy"], t["macro_f1"], t["ece"])
    point = metrics.get("operating_point")
    if point:
        log.info(
            "evaluate: operating point (%s, threshold %s): in-scope accuracy %.4f on %d%s",
            point["method"],
            point["threshold"],
            point["in_scope_accuracy"],
            point["n_in_scope"],
            f", OOS recall {point['oos_recall']:.4f} on {point['n_oos']}" if point["n_oos"] else "",
        )


@cli_entry
def main() -> None:
    from intentops.inference.ood import load_calibration
    from intentops.inference.predictor import Predictor

    cfg = load_params()
    paths = cfg.paths
    n_bins = int(cfg.evaluate.ece_bins)
    # The `calibrate` stage's fit: evaluate scores what serving will do (temperature, out-of-scope flags).
    calibration = load_calibration(paths.calibration) if Path(paths.calibration).is_file() else {}
    if not calibration:
        log.warning(
            "evaluate: no %s; reporting uncalibrated probabilities and no operating point", paths.calibration
        )
    predictor = Predictor.load(paths.model_dir).with_calibration(calibration)
    frame = pd.read_parquet(paths.test)
    log.info("evaluate: predicting %d test utterances through the Predictor", len(frame))
    proba_all, point = operating_point(predictor, frame, Taxonomy.read(paths.taxonomy).oos, n_bins)
    # Classification metrics over the rows whose label the model knows (a trained oos class included).
    test, y_true, kept = encode_labels(frame, predictor.labels)
    result = run_evaluate(proba_all[kept], y_true, predictor.labels, test["text"].tolist(), n_bins)
    metrics = result["metrics"]
    if calibration:
        # In-scope accuracy (flagged rows count as wrong) and OOS recall at the threshold `calibrate` chose.
        metrics["operating_point"] = point
    if Path(paths.baseline_metrics).is_file():  # the bar to clear, side by side with the model
        metrics["baseline_accuracy"] = read_json(paths.baseline_metrics)["test"]["accuracy"]
    write_reports(paths, result, metrics, str(cfg.data.name))
    log_summary(metrics)


if __name__ == "__main__":
    check_stage_args("evaluate", __doc__)  # --help, or exit 2 on any argument
    main()
