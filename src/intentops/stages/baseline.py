"""Stage `baseline`: TF-IDF word + char n-grams and a linear SVM, the bar every neural model must clear."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from sklearn.svm import LinearSVC

from intentops.config import check_stage_args, load_params
from intentops.errors import cli_entry
from intentops.io import write_metrics
from intentops.metrics import classification_summary
from intentops.models.tfidf import make_tfidf

log = logging.getLogger(__name__)


def run_baseline(train: pd.DataFrame, test: pd.DataFrame, tfidf: dict, C: float = 1.0, seed: int = 0) -> dict:
    """Fit TF-IDF + LinearSVC on `train`, score it on `test`.

    Returns:
        {"test": {"accuracy", "macro_f1"}, "fit_seconds", "n_features"}
    """
    t0 = time.perf_counter()
    vec = make_tfidf(**tfidf)
    x_train = vec.fit_transform(train["text"])
    clf = LinearSVC(C=C, random_state=seed).fit(x_train, train["label"])
    fit_s = time.perf_counter() - t0
    pred = clf.predict(vec.transform(test["text"]))
    return {
        "test": classification_summary(np.asarray(test["label"]), pred),
        "fit_seconds": round(fit_s, 3),
        "n_features": int(x_train.shape[1]),
    }


@cli_entry
def main() -> None:
    from omegaconf import OmegaConf

    cfg = load_params()
    paths, bcfg = cfg.paths, cfg.baseline
    train, test = pd.read_parquet(paths.train), pd.read_parquet(paths.test)
    metrics = run_baseline(train, test, OmegaConf.to_container(bcfg.tfidf), bcfg.C, cfg.seed)
    write_metrics(paths.baseline_metrics, metrics, paths.run_facts_dir, ("fit_seconds",))
    log.info(
        "baseline: test accuracy %.4f, macro-F1 %.4f",
        metrics["test"]["accuracy"],
        metrics["test"]["macro_f1"],
    )


if __name__ == "__main__":
    check_stage_args("baseline", __doc__)  # --help, or exit 2 on any argument
    main()
