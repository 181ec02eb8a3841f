"""Hydra sweeps over the `train` stage: `python -m intentops.sweep -m model.lr=1e-3,3e-3`.

Every trial calls the same `train_from_config` as the DVC stage and writes `<trial dir>/metrics.json`;
`SweepSummary` (a Hydra callback, see conf/config.yaml: hydra.callbacks) writes `<sweep dir>/summary.json`
naming the best trial. Optuna: `hparams_search=optuna`; local Ray: `hydra/launcher=ray`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from intentops.io import read_json, write_json

log = logging.getLogger(__name__)

OBJECTIVE = ("val", "accuracy")  # selection on validation, never on test


def trial(cfg: DictConfig) -> float:
    """One sweep trial: train, save metrics and bundle in the trial's folder, return val accuracy."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    from intentops.training import train_from_config

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    metrics = train_from_config(cfg, out / "model", out / "work", root=Path(get_original_cwd()))
    metrics["overrides"] = list(hc.overrides.task)
    write_json(out / "metrics.json", metrics)
    value = float(metrics[OBJECTIVE[0]][OBJECTIVE[1]])
    log.info("trial %s: %s/%s = %.4f", metrics["overrides"], *OBJECTIVE, value)
    return value


def summarise(sweep_dir: Path) -> dict:
    """Collect every trial's metrics.json under `sweep_dir`; the best trial by val accuracy comes first."""
    trials = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        m = read_json(path)
        trials.append(
            {
                "trial": path.parent.name,
                "overrides": m.get("overrides", []),
                "val_accuracy": m["val"]["accuracy"],
                "test_accuracy": m["test"]["accuracy"],
                "bundle": str(path.parent / "model"),
            }
        )
    trials.sort(key=lambda t: -t["val_accuracy"])
    return {
        "objective": "/".join(OBJECTIVE),
        "n_trials": len(trials),
        "best": trials[0] if trials else None,
        "trials": trials,
    }


class SweepSummary(Callback):
    """Writes <sweep dir>/summary.json when a multirun ends (any launcher, any sweeper)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarise(sweep_dir)
        write_json(sweep_dir / "summary.json", summary)
        if summary["best"]:
            log.info(
                "sweep: best of %d trials is %s (val accuracy %.4f); %s",
                summary["n_trials"],
                summary["best"]["overrides"],
                summary["best"]["val_accuracy"],
                sweep_dir / "summary.json",
            )


def main() -> None:
    """Console entry: Hydra parses sys.argv (overrides, -m) against conf/ at the project root."""
    import hydra

    from intentops.config import repo_root
    from intentops.errors import setup_logging

    setup_logging()
    hydra.main(config_path=str(repo_root() / "conf"), config_name="config", version_base=None)(trial)()


if __name__ == "__main__":
    main()
