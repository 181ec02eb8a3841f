"""Stage `calibrate`: temperature scaling, an out-of-scope threshold and review thresholds for the trained model.

Reads the train bundle's logits on val and test (precomputed embeddings, no re-encoding) and writes
models/calibration.json (+ an .npz of embedding statistics for "mahalanobis"/"knn") that
`intentops.inference.ood.postprocess` applies at serving time, plus ECE, OOS-detection metrics and DVC plots.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from intentops.config import check_stage_args, load_params
from intentops.data.splits import CROSSFIT_FILE, SPLITS, read_embeddings, read_splits
from intentops.data.taxonomy import Taxonomy
from intentops.errors import UserError, cli_entry
from intentops.inference.ood import (
    EMBEDDING_METHODS,
    HIGHER_IS_OOD,
    METHODS,
    detection_metrics,
    detection_score,
    expected_operating_point,
    fit_mahalanobis,
    fit_temperature,
    fit_threshold,
    postprocess,
    risk_coverage,
    roc_points,
    softmax,
    split_metrics,
    support_warnings,
    threshold_inputs,
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


# Where the temperature and the threshold were fitted, in words.
ROW_SOURCES = {
    "val": "chosen on val",
    "crossfit": "chosen on out-of-fold rows of train + val (train.crossfit)",
}


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
    crossfit: dict | None = None,
) -> dict:
    """Fit temperature, OOS threshold and review thresholds on val (or cross-fitted rows); measure them on val
    and test, and the coverage (and recall) to expect from the threshold, with a bootstrap interval.

    Args:
        val_logits, test_logits: (n, k) raw logits; rows whose label is out-of-scope carry y == -1.
        val_y, test_y: (n,) label ids, −1 for out-of-scope rows.
        cfg: the `calibrate` params as a plain dict.
        *_emb: L2-normalised sentence embeddings, needed only by "mahalanobis" and "knn".
        oos_index: the logit column of a trained out-of-scope class (split.oos_as_class), else None. Its rows
            carry y == -1 like any out-of-scope row; a top-1 on it flags the row, and the threshold is chosen
            for the rows it leaves (see `ood.postprocess`).
        crossfit: {"logits", "y"}: `train`'s out-of-fold logits over train + val (train.crossfit, small val),
            y −1 out-of-scope; the temperature and threshold are fitted on them instead of val (logit methods).

    Returns:
        {"calibration" (json-able, without arrays), "stats" (arrays for the .npz), "metrics", "plots"}
    """
    rows, warnings = calibration_rows(val_logits, val_y, val_emb, crossfit, cfg["method"])
    calibration, stats = fit_calibration(
        rows["logits"], rows["y"], cfg, oos_label, rows["emb"], train_emb, train_y, oos_index
    )
    ood = calibration["ood"]
    calibration["fitted_on"] = rows["source"]
    expected = expect(rows, calibration, cfg, oos_index)
    warnings += support_warnings(
        expected, ood["target"], float(cfg.get("max_shortfall", 0.05)), ROW_SOURCES[rows["source"]]
    )
    metrics = {
        "temperature": calibration["temperature"],
        "method": ood["method"],
        "threshold": ood["threshold"],
        "target": ood["target"],
        "calibration_rows": {"source": rows["source"], **expected},
        "warnings": warnings,
    }
    sets = {"val": (val_logits, val_y, val_emb), "test": (test_logits, test_y, test_emb)}
    if rows["source"] != "val":
        sets = {"crossfit": (rows["logits"], rows["y"], None), **sets}
    outs = {}
    for name, (logits, y, emb) in sets.items():
        outs[name], metrics[name] = measure(
            calibration, logits, y, emb, int(cfg.get("ece_bins", 15)), oos_index
        )
    plots = calibration_plots(outs["test"], test_y, ood["higher_is_ood"], oos_index, metrics["test"])
    calibration["ood"] = {k: v for k, v in ood.items() if k != "stats"}
    return {"calibration": calibration, "stats": stats, "metrics": metrics, "plots": plots}


def measure(calibration: dict, logits, y, emb, n_bins: int, oos_index: int | None) -> tuple[dict, dict]:
    """`postprocess` of one set of rows under `calibration`, and its metrics (ECE before and after)."""
    out = postprocess(logits, calibration, emb)
    m = split_metrics(out, y, y < 0, calibration["ood"]["higher_is_ood"], n_bins, oos_index)
    m["ece_before"] = expected_calibration_error(softmax(logits[y >= 0]), y[y >= 0], n_bins)
    m["ece_after"] = m.pop("ece")
    return out, m


def calibration_rows(
    val_logits: np.ndarray, val_y: np.ndarray, val_emb, crossfit: dict | None, method: str
) -> tuple[dict, list[str]]:
    """The rows the temperature and threshold are fitted on: `train`'s out-of-fold rows when it cross-fitted (a
    small val), else val; {"logits", "y", "emb", "source"}, and warnings."""
    val = {"logits": val_logits, "y": val_y, "emb": val_emb, "source": "val"}
    if crossfit is None:
        return val, []
    if method in EMBEDDING_METHODS:
        return val, [
            f"calibrate.method={method} scores embeddings against the training rows, which out-of-fold rows "
            f"belong to: the threshold is chosen on val ({len(val_y)} rows), not on train.crossfit's rows"
        ]
    y = np.asarray(crossfit["y"])
    return {
        "logits": np.asarray(crossfit["logits"]),
        "y": y,
        "emb": None,
        "source": "crossfit",
    }, []


def expect(rows: dict, calibration: dict, cfg: dict, oos_index: int | None) -> dict:
    """`ood.expected_operating_point` of the fitted threshold on the rows it was fitted on."""
    ood, boot = calibration["ood"], cfg.get("bootstrap") or {}
    x = threshold_inputs(rows["logits"], rows["y"], ood, calibration["temperature"], oos_index, rows["emb"])
    return expected_operating_point(
        x,
        ood["higher_is_ood"],
        ood["target"],
        int(boot.get("n", 1000)),
        float(boot.get("level", 0.95)),
        int(boot.get("seed", 0)),
        desc="calibrate: bootstrap",
    )


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
        "crossfit": read_crossfit(paths.model_dir, predictor.labels, oos_label),
        "val_logits": logits["val"],
        "val_y": ys["val"],
        "test_logits": logits["test"],
        "test_y": ys["test"],
        "val_emb": emb["val"],
        "test_emb": emb["test"],
        "train_emb": emb["train"][train_known],
        "train_y": ys["train"][train_known],
    }


def read_crossfit(model_dir, labels: list[str], oos_label: str | None) -> dict | None:
    """`train`'s out-of-fold logits and label ids (−1 out-of-scope, a trained out-of-scope class included), or
    None when it did not cross-fit."""
    path = Path(model_dir) / CROSSFIT_FILE
    if not path.is_file():
        return None
    with np.load(path) as npz:
        logits, y = npz["logits"], npz["y"].copy()
    if oos_label in labels:
        y[y == labels.index(oos_label)] = -1
    return {"logits": logits, "y": y}


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
    """Log the temperature, ECE before and after, the threshold, the expected and the test operating point,
    and every warning."""
    for key, fig in m["calibration_rows"]["expected"].items():
        log.info(
            "calibrate: expected %s %.4f [%.4f, %.4f] (%s, %d resamples; target %s)",
            key,
            fig["estimate"],
            fig["low"],
            fig["high"],
            ROW_SOURCES[m["calibration_rows"]["source"]],
            m["calibration_rows"]["resamples"],
            m["target"],
        )
    for w in m["warnings"]:
        log.warning("calibrate: %s", w)
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
    check_stage_args("calibrate", __doc__)  # --help, or exit 2 on any argument
    main()
