"""`train` on a small val: out-of-fold logits over train + val (val's out-of-scope rows scored, never trained on),
the memory weight chosen on them, the shipped model refit on train + val, and `calibrate` fitting on them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from intentops.config import compose
from intentops.data.splits import CROSSFIT_FILE
from intentops.stages.calibrate import read_crossfit, run_calibrate

N_OOS = 4


def with_oos_val_rows(root, cfg) -> None:
    """Append N_OOS test rows of one intent to val as out-of-scope (label "oos", the taxonomy's oos_label)."""
    paths = cfg.paths
    test, val = pd.read_parquet(root / paths.test), pd.read_parquet(root / paths.val)
    rows = test[test["label"] == "exchange_rate"].head(N_OOS).assign(label="oos")
    emb = np.load(root / paths.embeddings_dir / "test.npy")[rows.index.to_numpy()]
    pd.concat([val, rows], ignore_index=True).to_parquet(root / paths.val, index=False)
    val_emb = np.load(root / paths.embeddings_dir / "val.npy")
    np.save(root / paths.embeddings_dir / "val.npy", np.concatenate([val_emb, emb]))
    taxonomy = json.loads((root / paths.taxonomy).read_text())
    (root / paths.taxonomy).write_text(json.dumps({**taxonomy, "oos_label": "oos"}))


def test_crossfit_scores_every_row_out_of_fold_and_calibrate_fits_on_them(
    small_project, small_overrides, tmp_path
):
    from intentops.inference.predictor import Predictor
    from intentops.training import train_from_config

    root = tmp_path / "project"
    shutil.copytree(small_project[0], root)
    cfg = compose(
        small_overrides + ["model.max_epochs=3", "train.crossfit.enabled=true", "train.crossfit.folds=3"]
    )
    with_oos_val_rows(root, cfg)
    metrics = train_from_config(cfg, tmp_path / "bundle", tmp_path / "work", root=root)

    n = {s: len(pd.read_parquet(root / cfg.paths[s])) for s in ("train", "val")}
    cross = metrics["crossfit"]
    assert cross["used"] and cross["folds"] == 3 and cross["oos_rows"] == N_OOS
    assert cross["rows"] == n["train"] + n["val"]
    assert metrics["memory"]["chosen_on"] == "crossfit"
    assert metrics["memory"]["weight"] == cross["memory_weight"]
    assert metrics["refit_on_train_val"]["train_rows"] == n["train"] + n["val"] - N_OOS

    with np.load(tmp_path / "bundle" / CROSSFIT_FILE) as npz:
        logits, y = npz["logits"], npz["y"]
    assert logits.shape == (cross["rows"], 6) and (y == -1).sum() == N_OOS
    labels = Predictor.load(tmp_path / "bundle").labels
    known = y >= 0
    assert np.isclose((logits[known].argmax(1) == y[known]).mean(), cross["oof_accuracy"])

    crossfit = read_crossfit(tmp_path / "bundle", labels, "oos")
    calibrate_cfg = OmegaConf.to_container(compose(small_overrides).calibrate, resolve=True)
    result = run_calibrate(logits[:10], y[:10], logits[:10], y[:10], calibrate_cfg, "oos", crossfit=crossfit)
    rows = result["metrics"]["calibration_rows"]
    assert rows["source"] == "crossfit" and rows["oos_rows"] == N_OOS and rows["rows"] == known.sum()
    assert result["calibration"]["fitted_on"] == "crossfit" and "crossfit" in result["metrics"]
