"""Stage `calibrate`: temperature scaling, an out-of-scope threshold and review thresholds for the trained model.

Reads the train bundle's logits on val and test (precomputed embeddings, no re-encoding) and writes
models/calibration.json (+ an .npz of embedding statistics for "mahalanobis"/"knn") that
`intentops.inference.ood.postprocess` applies at serving time, plus ECE, OOS-detection metrics and DVC plots.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from intentops.config import load_params
from intentops.data.splits import SPLITS, read_embeddings, read_splits
from intentops.data.taxonomy import Taxonomy
from intentops.errors import UserError, cli_entry
from intentops.inference.ood import (
    EMBEDDING_METHODS,
    HIGHER_IS_OOD,
    METHODS,
    detection_metrics,
    detection_score,
    fit_mahalanobis,
    fit_temperature,
    fit_threshold,
    postprocess,
    risk_coverage,
    roc_points,
    softmax,
    split_metrics,
)
from intentops.io import atomic_path, write_json, write_npz
from intentops.metrics import expected_calibration_error
from intentops.models.labels import encode_with_oos

log = logging.getLogger(__name__)


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
    calibration, stats = fit_calibration(
        val_logits, val_y, cfg, oos_label, val_emb, train_emb, train_y, oos_index
    )
    n_bins = int(cfg.get("ece_bins", 15))
    ood = calibration["ood"]
    metrics = {
        "temperature": calibration["temperature"],
        "method": ood["method"],
        "threshold": ood["threshold"],
    }
    outs = {}
    for split, logits, y, emb in (
        ("val", val_logits, val_y, val_emb),
        ("test", test_logits, test_y, test_emb),
    ):
        outs[split] = out = postprocess(logits, calibration, emb)
        m = split_metrics(out, y, y < 0, ood["higher_is_ood"], n_bins, oos_index)
        m["ece_before"] = expected_calibration_error(softmax(logits[y >= 0]), y[y >= 0], n_bins)
        m["ece_after"] = m.pop("ece")
        metrics[split] = m
    plots = calibration_plots(
        outs["test"],
        test_y,
        ood["higher_is_ood"],
        oos_index,
        metrics["test"],
    )
    calibration["ood"] = {k: v for k, v in ood.items() if k != "stats"}
    return {"calibration": calibration, "stats": stats, "metrics": metrics, "plots": plots}


def fit_calibration(
    val_logits: np.ndarray,
    val_y: np.ndarray,
    cfg: dict,
    oos_label: str | None,
    val_emb: np.ndarray | None,
    train_emb: np.ndarray | None,
    train_y: np.ndarray | None,
    oos_index: int | None,
) -> tuple[dict, dict]:
    """Temperature, out-of-scope statistics and threshold, and review thresholds, fitted on val.

    Returns:
        (calibration in `ood.postprocess`'s shape, its "ood" still holding the "stats" arrays; the stats)
    """
    method = cfg["method"]
    if method not in METHODS:
        raise UserError(
            f"unknown OOD method {method!r}",
            where="conf/config.yaml: calibrate.method",
            fix=f"choose one of {list(METHODS)}",
        )
    val_oos = val_y < 0
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
    # Out-of-scope rows in val: meet the recall target; none (Banking77): meet the in-scope target instead.
    target = dict(cfg["target"] if val_oos.any() else cfg["target_without_oos"])
    threshold = fit_threshold(val_logits, val_y, ood, temperature, target, oos_index, val_emb)
    ood.update(threshold=threshold, target=target)
    review = {k: float(cfg["review"][k]) for k in ("min_confidence", "min_margin")}
    calibration = {
        "temperature": temperature,
        "ood": ood,
        "review": review,
        "oos_label": oos_label,
        "oos_index": oos_index,
    }
    return calibration, stats


def calibration_plots(
    out: dict, test_y: np.ndarray, higher_is_ood: bool, oos_index: int | None, test_metrics: dict
) -> dict:
    """Plots on test: risk-coverage over in-scope rows abstaining by calibrated confidence; the OOS ROC, or
    without OOS rows the ROC of catching the classifier's own errors by the same score (added to `test_metrics`)."""
    test_oos = test_y < 0
    ins = ~test_oos
    plots = {}
    plots["risk_coverage"], test_metrics["aurc"] = risk_coverage(
        out["confidence"][ins], (out["pred"] == test_y)[ins]
    )
    if test_oos.any():
        plots["roc"] = roc_points(detection_score(out, higher_is_ood, oos_index), test_oos, higher_is_ood)
        return plots
    wrong = out["pred"][ins] != test_y[ins]
    plots["roc"] = roc_points(out["ood_score"][ins], wrong, higher_is_ood)
    test_metrics.update(
        {
            f"error_detection_{k}": v
            for k, v in detection_metrics(out["ood_score"][ins], wrong, higher_is_ood).items()
        }
    )
    return plots


def calibration_inputs(paths, predictor, oos_label: str) -> dict:
    """Val/test logits, label ids (−1 out-of-scope) and embeddings, plus train's, for `run_calibrate`."""
    frames = read_splits(paths)
    emb = read_embeddings(paths, frames)
    ys = {s: encode_with_oos(frames[s], predictor.labels, oos_label) for s in SPLITS}
    unknown = frames["val"]["label"][(ys["val"] < 0) & (frames["val"]["label"] != oos_label)]
    if len(unknown):
        log.warning(
            "calibrate: %d val rows have labels the model does not know (e.g. %r); treated as out-of-scope",
            len(unknown),
            unknown.iloc[0],
        )
    logits = {
        s: predictor.logits(frames[s]["text"].tolist(), emb[s], batch_size=512) for s in ("val", "test")
    }
    train_known = ys["train"] >= 0
    return {
        "val_logits": logits["val"],
        "val_y": ys["val"],
        "test_logits": logits["test"],
        "test_y": ys["test"],
        "val_emb": emb["val"],
        "test_emb": emb["test"],
        "train_emb": emb["train"][train_known],
        "train_y": ys["train"][train_known],
    }


def write_outputs(paths, result: dict) -> None:
    """calibration.json + its .npz of statistics, the metrics and the two DVC plots, each written atomically."""
    result["calibration"]["ood"]["stats_file"] = paths.calibration_stats.rsplit("/", 1)[-1]
    write_npz(paths.calibration_stats, result["stats"])
    write_json(paths.calibration, result["calibration"])
    with atomic_path(paths.calibrate_risk_coverage) as tmp:
        pd.DataFrame(result["plots"]["risk_coverage"]).to_csv(tmp, index=False)
    with atomic_path(paths.calibrate_roc) as tmp:
        pd.DataFrame(result["plots"]["roc"]).to_csv(tmp, index=False)
    write_json(paths.calibrate_metrics, result["metrics"])


def log_summary(m: dict) -> None:
    """One log line: temperature, ECE before and after, the threshold and the test operating point."""
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


@cli_entry
def main() -> None:
    from omegaconf import OmegaConf

    from intentops.inference.predictor import Predictor

    params = load_params()
    paths, cfg = params.paths, OmegaConf.to_container(params.calibrate, resolve=True)
    predictor = Predictor.load(paths.model_dir)
    # The label out-of-scope rows carry; Banking77 has none in its taxonomy, so "oos" as in CLINC150.
    oos_label = Taxonomy.read(paths.taxonomy).oos
    # CLINC150 with split.oos_as_class: the model has an out-of-scope class of its own.
    oos_index = predictor.labels.index(oos_label) if oos_label in predictor.labels else None
    result = run_calibrate(
        cfg=cfg, oos_label=oos_label, oos_index=oos_index, **calibration_inputs(paths, predictor, oos_label)
    )
    write_outputs(paths, result)
    log_summary(result["metrics"])


if __name__ == "__main__":
    main()
