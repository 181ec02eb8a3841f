"""Stage `calibrate`: temperature scaling, an out-of-scope threshold and review thresholds for the trained model.

Reads the train bundle's logits on val and test (precomputed embeddings, no re-encoding) and writes
models/calibration.json (+ an .npz of embedding statistics for "mahalanobis"/"knn") that
`intentops.ood.postprocess` applies at serving time, plus ECE, OOS-detection metrics and DVC plots.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from intentops.config import load_params
from intentops.errors import UserError, cli_entry
from intentops.io import atomic_path, read_json, write_json
from intentops.metrics import expected_calibration_error
from intentops.ood import (
    EMBEDDING_METHODS,
    HIGHER_IS_OOD,
    METHODS,
    choose_threshold,
    detection_metrics,
    detection_score,
    fit_mahalanobis,
    fit_temperature,
    ood_scores,
    postprocess,
    risk_coverage,
    roc_points,
)
from intentops.predictor import softmax

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def predictor_logits(
    predictor, texts: list[str], embeddings: np.ndarray | None = None, batch_size: int = 512
) -> np.ndarray:
    """Raw logits (n, k) from a loaded Predictor; `embeddings` skips re-encoding.

    The ONNX Predictor runs its own encoder, so `embeddings` goes only to the torch one.
    """
    if embeddings is None:
        return predictor.logits(texts)
    return predictor.logits(texts, batch_size=batch_size, embeddings=embeddings)


def fit_ood_stats(
    method: str, train_emb: np.ndarray | None, train_y: np.ndarray, cfg: dict
) -> dict[str, np.ndarray]:
    """The arrays an embedding method needs at serving time (empty for logit methods)."""
    if method == "mahalanobis":
        return fit_mahalanobis(train_emb, train_y, float(cfg.get("shrinkage", 0.1)))
    if method == "knn":
        # float16 halves the file; cosine similarities keep ~3 significant digits, plenty for a threshold.
        return {"bank": train_emb.astype(np.float16)}
    return {}


def split_metrics(
    out: dict, y: np.ndarray, is_oos: np.ndarray, higher_is_ood: bool, n_bins: int, oos_index: int | None = None
) -> dict:
    """What one split reports once postprocessed: accuracy with rejections, OOS recall, detection metrics.

    `oos_auroc`/`oos_fpr_at_95_tpr` rank rows as deployed (`ood.detection_score`: a top-1 on a trained
    out-of-scope class counts as most out-of-scope); with such a class, `oos_score_only_*` are the score's own.
    """
    ins = ~is_oos
    pred_ok = (out["pred"] == y) & ins
    accepted_ok = pred_ok & ~out["out_of_scope"]
    m = {
        "n_in_scope": int(ins.sum()),
        "n_oos": int(is_oos.sum()),
        "accuracy": float(pred_ok[ins].mean()),
        # In-scope rows flagged out-of-scope count as errors (as in Larson et al. 2019).
        "in_scope_accuracy": float(accepted_ok[ins].mean()),
        "coverage": float((~out["out_of_scope"][ins]).mean()),
        "needs_review_rate": float(out["needs_review"][ins].mean()),
        "ece": expected_calibration_error(out["proba"][ins], y[ins], n_bins),
    }
    accepted = ~out["out_of_scope"]
    if accepted.any():
        m["in_scope_precision"] = float(accepted_ok[accepted].mean())
    if is_oos.any():
        m["oos_recall"] = float(out["out_of_scope"][is_oos].mean())
        score = detection_score(out, higher_is_ood, oos_index)
        m.update({f"oos_{k}": v for k, v in detection_metrics(score, is_oos, higher_is_ood).items()})
        if oos_index is not None:
            m.update(
                {
                    f"oos_score_only_{k}": v
                    for k, v in detection_metrics(out["ood_score"], is_oos, higher_is_ood).items()
                }
            )
    return m


def run_calibrate(
    val_logits: np.ndarray,
    val_y: np.ndarray,
    test_logits: np.ndarray,
    test_y: np.ndarray,
    cfg: dict,
    oos_label: str | None,
    val_emb: np.ndarray | None = None,
    test_emb: np.ndarray | None = None,
    train_emb: np.ndarray | None = None,
    train_y: np.ndarray | None = None,
    oos_index: int | None = None,
) -> dict:
    """Fit temperature, OOS threshold and review thresholds on val; measure them on val and test.

    Args:
        val_logits, test_logits: (n, k) raw logits; rows whose label is out-of-scope carry y == -1.
        val_y, test_y: (n,) label ids, −1 for out-of-scope rows.
        cfg: the `calibrate` params as a plain dict.
        *_emb: L2-normalised sentence embeddings, needed only by "mahalanobis" and "knn".
        oos_index: the logit column of a trained out-of-scope class (split.oos_as_class), else None. Its rows
            carry y == -1 like any out-of-scope row; a top-1 on it flags the row, and the threshold is chosen
            for the rows it leaves (see `ood.postprocess`).

    Returns:
        {"calibration" (json-able, without arrays), "stats" (arrays for the .npz), "metrics", "plots"}
    """
    method = cfg["method"]
    if method not in METHODS:
        raise UserError(
            f"unknown OOD method {method!r}",
            where="conf/config.yaml: calibrate.method",
            fix=f"choose one of {list(METHODS)}",
        )
    n_bins = int(cfg.get("ece_bins", 15))
    val_oos, test_oos = val_y < 0, test_y < 0
    temperature = (
        fit_temperature(val_logits[~val_oos], val_y[~val_oos]) if cfg.get("fit_temperature", True) else 1.0
    )

    stats = fit_ood_stats(method, train_emb, train_y, cfg) if method in EMBEDDING_METHODS else {}
    ood = {
        "method": method,
        "higher_is_ood": HIGHER_IS_OOD[method],
        "k": int(cfg.get("k", 10)),
        "stats": stats,
    }
    val_in_scope = val_logits if oos_index is None else np.delete(val_logits, oos_index, axis=1)
    val_scores = ood_scores(val_in_scope, ood, temperature, val_emb)
    val_pred = softmax(val_logits, temperature).argmax(axis=1)
    val_correct = (val_pred == val_y) & ~val_oos
    val_flagged = val_pred == oos_index if oos_index is not None else None
    # Out-of-scope rows in val: meet the recall target; none (Banking77): meet the in-scope target instead.
    target = dict(cfg["target"] if val_oos.any() else cfg["target_without_oos"])
    threshold = choose_threshold(val_scores, val_oos, val_correct, ood["higher_is_ood"], target, val_flagged)
    ood.update(threshold=threshold, target=target)

    calibration = {
        "temperature": temperature,
        "ood": ood,
        "review": {
            "min_confidence": float(cfg["review"]["min_confidence"]),
            "min_margin": float(cfg["review"]["min_margin"]),
        },
        "oos_label": oos_label,
        "oos_index": oos_index,
    }
    metrics, plots = {"temperature": temperature, "method": method, "threshold": threshold}, {}
    for split, logits, y, oos, emb in (
        ("val", val_logits, val_y, val_oos, val_emb),
        ("test", test_logits, test_y, test_oos, test_emb),
    ):
        out = postprocess(logits, calibration, emb)
        m = split_metrics(out, y, oos, ood["higher_is_ood"], n_bins, oos_index)
        m["ece_before"] = expected_calibration_error(softmax(logits[~oos]), y[~oos], n_bins)
        m["ece_after"] = m.pop("ece")
        metrics[split] = m
    # Plots on test: risk-coverage over in-scope rows abstaining by calibrated confidence; the OOS ROC, or
    # without OOS rows the ROC of catching the classifier's own errors by the same score.
    out = postprocess(test_logits, calibration, test_emb)
    ins = ~test_oos
    plots["risk_coverage"], metrics["test"]["aurc"] = risk_coverage(
        out["confidence"][ins], (out["pred"] == test_y)[ins]
    )
    if test_oos.any():
        plots["roc"] = roc_points(detection_score(out, ood["higher_is_ood"], oos_index), test_oos, ood["higher_is_ood"])
    else:
        wrong = out["pred"][ins] != test_y[ins]
        plots["roc"] = roc_points(out["ood_score"][ins], wrong, ood["higher_is_ood"])
        metrics["test"].update(
            {
                f"error_detection_{k}": v
                for k, v in detection_metrics(out["ood_score"][ins], wrong, ood["higher_is_ood"]).items()
            }
        )
    calibration["ood"] = {k: v for k, v in ood.items() if k != "stats"}
    return {"calibration": calibration, "stats": stats, "metrics": metrics, "plots": plots}


def encode_with_oos(frame: pd.DataFrame, labels: list[str], oos_label: str | None = None) -> np.ndarray:
    """Label ids (n,) in `labels` order, −1 for out-of-scope rows: labels the model does not know, and
    `oos_label` even where the model was trained on it as a class (split.oos_as_class)."""
    index = {name: i for i, name in enumerate(labels) if name != oos_label}
    return frame["label"].map(index).fillna(-1).to_numpy(np.int64)


@cli_entry
def main() -> None:
    from omegaconf import OmegaConf

    from intentops.predictor import Predictor

    params = load_params()
    paths, cfg = params.paths, OmegaConf.to_container(params.calibrate, resolve=True)
    predictor = Predictor.load(paths.model_dir)
    # The label serving emits for out-of-scope rows; Banking77 has none in its taxonomy, so "oos" as in CLINC150.
    oos_label = read_json(paths.taxonomy).get("oos_label") or "oos"
    frames = {s: pd.read_parquet(paths[s]) for s in SPLITS}
    emb = {s: np.load(f"{paths.embeddings_dir}/{s}.npy") for s in SPLITS}
    for s in SPLITS:
        if len(emb[s]) != len(frames[s]):
            raise UserError(
                f"{s} embeddings ({len(emb[s])} rows) do not match {paths[s]} ({len(frames[s])})",
                where=f"{paths.embeddings_dir}/{s}.npy",
                fix="re-run `dvc repro embed`",
            )
    ys = {s: encode_with_oos(frames[s], predictor.labels, oos_label) for s in SPLITS}
    # CLINC150 with split.oos_as_class: the model has an out-of-scope class of its own.
    oos_index = predictor.labels.index(oos_label) if oos_label in predictor.labels else None
    unknown = frames["val"]["label"][(ys["val"] < 0) & (frames["val"]["label"] != oos_label)]
    if len(unknown):
        log.warning(
            "calibrate: %d val rows have labels the model does not know (e.g. %r); treated as out-of-scope",
            len(unknown),
            unknown.iloc[0],
        )
    logits = {s: predictor_logits(predictor, frames[s]["text"].tolist(), emb[s]) for s in ("val", "test")}
    train_known = ys["train"] >= 0
    result = run_calibrate(
        logits["val"],
        ys["val"],
        logits["test"],
        ys["test"],
        cfg,
        oos_label,
        emb["val"],
        emb["test"],
        emb["train"][train_known],
        ys["train"][train_known],
        oos_index,
    )

    result["calibration"]["ood"]["stats_file"] = paths.calibration_stats.rsplit("/", 1)[-1]
    with atomic_path(paths.calibration_stats) as tmp:
        with open(tmp, "wb") as fh:  # np.savez would append ".npz" to a bare temp name
            np.savez(fh, **result["stats"])
    write_json(paths.calibration, result["calibration"])
    with atomic_path(paths.calibrate_risk_coverage) as tmp:
        pd.DataFrame(result["plots"]["risk_coverage"]).to_csv(tmp, index=False)
    with atomic_path(paths.calibrate_roc) as tmp:
        pd.DataFrame(result["plots"]["roc"]).to_csv(tmp, index=False)
    write_json(paths.calibrate_metrics, result["metrics"])
    m = result["metrics"]
    log.info(
        "calibrate: T=%.3f; ECE val %.4f -> %.4f, test %.4f -> %.4f; %s threshold %.4f; test in-scope accuracy "
        "%.4f, coverage %.4f%s",
        m["temperature"],
        m["val"]["ece_before"],
        m["val"]["ece_after"],
        m["test"]["ece_before"],
        m["test"]["ece_after"],
        m["method"],
        m["threshold"],
        m["test"]["in_scope_accuracy"],
        m["test"]["coverage"],
        f", OOS recall {m['test']['oos_recall']:.4f}, AUROC {m['test']['oos_auroc']:.4f}"
        if "oos_recall" in m["test"]
        else "",
    )


if __name__ == "__main__":
    main()
