"""Stage `train`: fit the configured model (conf/model/) and save its Predictor bundle (intentops.training)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from intentops.config import check_stage_args, load_params
from intentops.errors import cli_entry
from intentops.io import atomic_path, write_metrics
from intentops.training import train_from_config

log = logging.getLogger(__name__)

# What one run on one machine measured: reports/runs/train.json, not the metrics output.
RUN_FACTS = ("inference_ms_per_sentence", "fit_seconds", "crossfit_seconds", "seconds", "wandb")


@cli_entry
def main() -> None:
    cfg = load_params()
    paths = cfg.paths
    with (
        atomic_path(paths.model_dir) as bundle_tmp,
        tempfile.TemporaryDirectory(prefix="intentops-train-") as work,
    ):
        metrics = train_from_config(cfg, bundle_tmp, Path(work))
    write_metrics(paths.train_metrics, metrics, paths.run_facts_dir, RUN_FACTS)
    log.info(
        "train (%s): val accuracy %.4f, test accuracy %.4f, %d params, %.2f ms/sentence",
        metrics["model"],
        metrics["val"]["accuracy"],
        metrics["test"]["accuracy"],
        metrics["size"]["params"],
        metrics["inference_ms_per_sentence"],
    )


if __name__ == "__main__":
    check_stage_args("train", __doc__)  # --help, or exit 2 on any argument
    main()
