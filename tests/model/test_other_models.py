"""The non-default models build from their conf/model/*.yaml and train end to end on CPU (tiny runs)."""

from __future__ import annotations

import pytest

from intentops.config import compose
from intentops.inference.predictor import Predictor
from intentops.training import train_from_config
from support import INTENT_TEMPLATES


@pytest.mark.parametrize(
    "model, extra",
    [
        # One step of the full MiniLM fine-tune: proves the GPU model's code path on CPU.
        (
            "minilm_finetune",
            [
                "+trainer.limit_train_batches=1",
                "+trainer.limit_val_batches=1",
                "model.max_epochs=1",
                "model.batch_size=4",
                "train.eval_batch_size=8",
            ],
        ),
        ("bilstm", ["model.max_epochs=2"]),
    ],
)
def test_model_trains_and_its_bundle_predicts(small_project, small_overrides, tmp_path, model, extra):
    root, _ = small_project
    cfg = compose(small_overrides + [f"model={model}"] + extra)
    metrics = train_from_config(cfg, tmp_path / "bundle", tmp_path / "work", root=root)
    assert metrics["model"] == model and metrics["size"]["trainable_params"] > 0
    predictor = Predictor.load(tmp_path / "bundle")
    proba = predictor.predict_proba(["my card was stolen", "top up failed"])
    assert proba.shape == (2, len(INTENT_TEMPLATES))


def test_missing_bundle_is_a_user_error(tmp_path):
    from intentops.errors import UserError

    with pytest.raises(UserError, match="no model bundle"):
        Predictor.load(tmp_path)


def test_refit_on_train_val_trains_on_both_and_keeps_selection_val(small_project, small_overrides, tmp_path):
    import pandas as pd

    root, cfg0 = small_project
    cfg = compose(small_overrides + ["model.max_epochs=3", "train.refit_on_train_val=true"])
    metrics = train_from_config(cfg, tmp_path / "bundle", tmp_path / "work", root=root)
    n_train_val = sum(len(pd.read_parquet(root / cfg0.paths[s])) for s in ("train", "val"))
    refit = metrics["refit_on_train_val"]
    assert refit["epochs"] == metrics["best_epoch"] + 1 and refit["train_rows"] == n_train_val
    assert 0.0 <= metrics["val"]["accuracy"] <= 1.0  # from the selection run, before val joined training
    proba = Predictor.load(tmp_path / "bundle").predict_proba(["my card was stolen", "top up failed"])
    assert proba.shape == (2, len(INTENT_TEMPLATES))


@pytest.mark.gpu
def test_minilm_finetune_trains_with_the_gpu_trainer(small_project, small_overrides, tmp_path):
    """`model=minilm_finetune trainer=gpu` as composed from conf/: mixed precision on CUDA, bundle predicts on CPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (trainer=gpu)")
    root, _ = small_project
    cfg = compose(
        small_overrides
        + [
            "model=minilm_finetune",
            "trainer=gpu",
            "model.max_epochs=2",
            "model.batch_size=8",
            "train.eval_batch_size=16",
        ]
    )
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "16-mixed"
    metrics = train_from_config(cfg, tmp_path / "bundle", tmp_path / "work", root=root)
    assert metrics["epochs_run"] >= 1 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    proba = Predictor.load(tmp_path / "bundle").predict_proba(["my card was stolen", "top up failed"])
    assert proba.shape == (2, len(INTENT_TEMPLATES)) and abs(float(proba.sum(1).mean()) - 1.0) < 1e-4
