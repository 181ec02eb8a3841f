"""Stage `train`: fit the configured model (conf/model/) and save its Predictor bundle (intentops.training)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from intentops.config import load_params
from intentops.errors import cli_entry
from intentops.io import atomic_path, write_json
from intentops.training import train_from_config

log = logging.getLogger(__name__)


@cli_entry
def main() -> None:
    cfg = load_params()
    paths = cfg.paths
    with (
        atomic_path(paths.model_dir) as bundle_tmp,
        tempfile.TemporaryDirectory(prefix="intentops-train-") as work,
    ):
        metrics = train_from_config(cfg, bundle_tmp, Path(work))
    write_json(paths.train_metrics, metrics)
    log.info(
        "train (%s): val accuracy %.4f, test accuracy %.4f, %d params, %.2f ms/sentence",
        metrics["model"],
        metrics["val"]["accuracy"],
        metrics["test"]["accuracy"],
        metrics["size"]["params"],
        metrics["inference_ms_per_sentence"],
    )


if __name__ == "__main__":
    main()
