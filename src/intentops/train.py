"""Stage `train`: fit the configured model (conf/model/) with PyTorch Lightning and save a Predictor bundle."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from intentops.config import load_params
from intentops.errors import UserError, cli_entry
from intentops.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def label_space(taxonomy: dict, train_labels: pd.Series) -> list[str]:
    """The classes the model predicts: the taxonomy's, plus the out-of-scope label if training data has it."""
    labels = list(taxonomy["labels"])
    oos = taxonomy.get("oos_label")
    if oos and oos not in labels and (train_labels == oos).any():
        labels.append(oos)
    missing = sorted(set(train_labels) - set(labels))
    if missing:
        raise UserError(f"training labels missing from the taxonomy: {missing[:5]}",
                        where="data/interim/taxonomy.json", fix="re-run `dvc repro ingest split`")
    return labels


def encode_labels(frame: pd.DataFrame, labels: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Keep rows whose label is in `labels`; return (rows, label ids, kept positions in the original frame)."""
    index = {name: i for i, name in enumerate(labels)}
    keep = frame["label"].isin(index).to_numpy()
    rows = frame[keep].reset_index(drop=True)
    return rows, rows["label"].map(index).to_numpy(np.int64), np.flatnonzero(keep)


def make_logger(cfg: DictConfig, root: Path):
    """The configured Lightning logger, or False for `logger=none`. W&B runs offline without an API key."""
    lcfg = cfg.get("logger")
    if not lcfg or "_target_" not in lcfg:
        return False
    from hydra.utils import instantiate

    if "wandb" in lcfg._target_.lower():
        os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        (root / lcfg.save_dir).mkdir(parents=True, exist_ok=True)
        return instantiate(lcfg, save_dir=str(root / lcfg.save_dir))
    return instantiate(lcfg)


def model_size(net, bundle_dir: Path | None = None) -> dict:
    """Parameter counts and on-disk bytes of the bundle (weights + featurizer)."""
    size = {
        "params": int(sum(p.numel() for p in net.parameters())),
        "trainable_params": int(sum(p.numel() for p in net.parameters() if p.requires_grad)),
        "weights_bytes": int(sum(p.numel() * p.element_size() for p in net.parameters())),
    }
    if bundle_dir is not None:
        size["bundle_bytes"] = int(sum(f.stat().st_size for f in Path(bundle_dir).rglob("*") if f.is_file()))
    return size


def time_inference(predictor, texts: list[str], repeats: int = 1) -> float:
    """Milliseconds per sentence through the whole Predictor (encoder, TF-IDF, head), batched."""
    predictor.predict_proba(texts[:8])  # warm-up: lazy encoder load, first-call allocations
    t0 = time.perf_counter()
    for _ in range(repeats):
        predictor.predict_proba(texts)
    return 1000.0 * (time.perf_counter() - t0) / (repeats * max(len(texts), 1))


def featurize(featurizer_cfg, texts: dict[str, list[str]], embeddings: dict) -> tuple[object, dict]:
    """Fit the configured featurizer on `texts["train"]`, then transform every split.

    Args:
        embeddings: split -> precomputed sentence embeddings aligned with `texts`, or None per split.
    """
    from hydra.utils import instantiate

    featurizer = instantiate(featurizer_cfg, _convert_="all")
    featurizer.fit(texts["train"], embeddings["train"])
    return featurizer, {s: featurizer.transform(texts[s], embeddings[s]) for s in texts}


def make_module(mcfg: DictConfig, net_kwargs: dict):
    """A fresh network of `mcfg.net` wrapped in the LightningModule with `mcfg`'s optimiser and loss."""
    from hydra.utils import instantiate

    from intentops.models.module import IntentClassifier

    net = instantiate(mcfg.net, **net_kwargs)
    return IntentClassifier(net, net_kwargs["n_classes"], instantiate(mcfg.optimizer),
                            label_smoothing=mcfg.get("label_smoothing", 0.0), scheduler=mcfg.get("scheduler"))


def memory_weight_scores(net, val_features: dict, val_ids: np.ndarray, grid: list[float],
                         batch_size: int = 512) -> dict[float, float]:
    """Val accuracy of `net` with its memory term at each weight in `grid` (the memory must be attached)."""
    import torch

    from intentops.models.data import slice_batch

    base, memory = [], []
    saved, net.knn_weight = net.knn_weight, 0.0
    with torch.inference_mode():
        for start in range(0, len(val_ids), batch_size):
            batch = slice_batch(val_features, np.arange(start, min(start + batch_size, len(val_ids))))
            base.append(net(**batch))
            memory.append(net.memory_logits(batch["emb"]))
    net.knn_weight = saved
    base, memory = torch.cat(base), torch.cat(memory)  # (n, k) each
    labels = torch.from_numpy(val_ids)
    return {float(w): float(((base + w * memory).argmax(1) == labels).float().mean()) for w in grid}


def fit_memory(net, features: dict, ids: dict, net_kwargs: dict, grid: list[float] | None,
               weight: float | None = None) -> tuple[dict, dict | None]:
    """Attach the training rows as the head's memory and pick its weight on val (after training, never trained).

    Args:
        grid: weights to try; the best val accuracy wins, ties going to the smaller weight. Empty: no memory.
        weight: use this weight instead of choosing (the refit on train+val, whose val is training data).

    Returns:
        (net_kwargs for the bundle, with bank_size; {"weight", "val_accuracy": {weight: acc}} or None)
    """
    if not grid or not hasattr(net, "attach_memory"):
        return net_kwargs, None
    net.attach_memory(features["train"]["emb"], ids["train"])
    scores = None
    if weight is None:
        scores = memory_weight_scores(net, features["val"], ids["val"], grid)
        weight = max(sorted(scores), key=lambda w: scores[w])  # first (smallest) of the best
    net.knn_weight = float(weight)
    if not weight:  # no memory: keep the bundle small
        net.attach_memory(np.zeros((0, features["train"]["emb"].shape[1]), np.float32), np.zeros(0, np.int64))
    info = {"weight": float(weight), **({"val_accuracy": {str(w): a for w, a in scores.items()}} if scores else {})}
    return {**net_kwargs, "bank_size": len(net.bank)}, info


def train_from_config(cfg: DictConfig, bundle_dir: Path, work_dir: Path, root: Path = Path(".")) -> dict:
    """Train the model `cfg` describes on the data under `cfg.paths`, save its bundle, return its metrics.

    Shared by the `train` stage and the Hydra sweep entry point (`intentops.sweep`).

    Args:
        bundle_dir: where the Predictor bundle goes (created).
        work_dir: checkpoints and other scratch files.
        root: the project root that `cfg.paths` are relative to.
    """
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from intentops.models.data import IntentDataModule
    from intentops.predictor import Predictor

    t_start = time.perf_counter()
    paths, mcfg, tcfg = cfg.paths, cfg.model, cfg.train
    pl.seed_everything(int(tcfg.seed), workers=True, verbose=False)
    torch.set_num_threads(max(1, int(tcfg.get("num_threads") or os.cpu_count() or 1)))

    taxonomy = read_json(root / paths.taxonomy)
    frames = {s: pd.read_parquet(root / paths[s]) for s in SPLITS}
    labels = label_space(taxonomy, frames["train"]["label"])
    embeddings = None
    if mcfg.get("uses_embeddings"):
        emb_dir = root / paths.embeddings_dir
        embeddings = {s: np.load(emb_dir / f"{s}.npy") for s in SPLITS}
        for s in SPLITS:
            if len(embeddings[s]) != len(frames[s]):
                raise UserError(f"{s} embeddings ({len(embeddings[s])} rows) do not match {paths[s]} ({len(frames[s])})",
                                where=str(emb_dir / f"{s}.npy"), fix="re-run `dvc repro embed`")

    rows, ids, embs = {}, {}, {}
    for s in SPLITS:
        rows[s], ids[s], kept = encode_labels(frames[s], labels)
        embs[s] = None if embeddings is None else embeddings[s][kept]
    texts = {s: rows[s]["text"].tolist() for s in SPLITS}
    featurizer, features = featurize(mcfg.featurizer, texts, embs)
    net_kwargs = {"n_classes": len(labels), **featurizer.net_kwargs()}
    module = make_module(mcfg, net_kwargs)
    dm = IntentDataModule(features, ids, batch_size=mcfg.batch_size, eval_batch_size=tcfg.eval_batch_size)

    logger = make_logger(cfg, root)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    checkpoint = ModelCheckpoint(dirpath=work_dir / "checkpoints", monitor=tcfg.monitor, mode=tcfg.mode,
                                 save_top_k=1, filename="best")
    trainer = instantiate(cfg.trainer, callbacks=[
        EarlyStopping(monitor=tcfg.monitor, mode=tcfg.mode, patience=tcfg.patience),
        checkpoint,
    ], logger=logger, default_root_dir=str(work_dir))
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t_fit
    best_epoch = int(trainer.current_epoch)
    if checkpoint.best_model_path:  # back to the weights of the best validation epoch
        ckpt = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(ckpt["state_dict"])
        best_epoch = int(ckpt["epoch"])
    best = module
    grid = mcfg.get("knn_weight_grid")
    saved_kwargs, memory = fit_memory(best.net, features, ids, net_kwargs, grid)
    val = trainer.validate(best, datamodule=dm, verbose=False)[0]
    test = trainer.test(best, datamodule=dm, verbose=False)[0]
    epochs_run = int(trainer.current_epoch)

    refit = None
    if tcfg.get("refit_on_train_val"):
        selection_test = float(test["test/accuracy"])
        # Val chose the epoch count; now the 10 % it held out trains too (Banking77: +0 to +0.1 test accuracy).
        # From here on val is training data, so the val metrics reported stay those of the selection run.
        pl.seed_everything(int(tcfg.seed), workers=True, verbose=False)
        tv_texts = {"train": texts["train"] + texts["val"], "val": texts["val"], "test": texts["test"]}
        tv_embs = {"train": None if embeddings is None else np.concatenate([embs["train"], embs["val"]]),
                   "val": embs["val"], "test": embs["test"]}
        featurizer, features = featurize(mcfg.featurizer, tv_texts, tv_embs)
        net_kwargs = {"n_classes": len(labels), **featurizer.net_kwargs()}
        best = make_module(mcfg, net_kwargs)
        tv_ids = {"train": np.concatenate([ids["train"], ids["val"]]), "val": ids["val"], "test": ids["test"]}
        dm = IntentDataModule(features, tv_ids, batch_size=mcfg.batch_size, eval_batch_size=tcfg.eval_batch_size)
        refit_trainer = instantiate(cfg.trainer, max_epochs=best_epoch + 1, limit_val_batches=0, logger=False,
                                    enable_checkpointing=False, default_root_dir=str(work_dir))
        t_fit = time.perf_counter()
        refit_trainer.fit(best, datamodule=dm)
        fit_s += time.perf_counter() - t_fit
        saved_kwargs, _ = fit_memory(best.net, features, tv_ids, net_kwargs, grid,
                                     weight=memory["weight"] if memory else None)
        test = refit_trainer.test(best, datamodule=dm, verbose=False)[0]
        refit = {"epochs": best_epoch + 1, "train_rows": len(tv_ids["train"]),
                 "selection_run_test_accuracy": selection_test}

    predictor = Predictor(featurizer, best.net.cpu(), labels)
    net_config = OmegaConf.to_container(mcfg.net, resolve=True)
    if memory:
        net_config["knn_weight"] = memory["weight"]
    predictor.save(bundle_dir, net_config, saved_kwargs, extra={"model": mcfg.name, "encoder": cfg.embed.model})
    sample = rows["test"]["text"].tolist()[: int(tcfg.inference_sample)]
    metrics = {
        "model": mcfg.name,
        "val": {k.split("/", 1)[1]: float(v) for k, v in val.items() if k.startswith("val/")},
        "test": {k.split("/", 1)[1]: float(v) for k, v in test.items() if k.startswith("test/")},
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "refit_on_train_val": refit,
        "memory": memory,
        "size": model_size(best.net, bundle_dir),
        "inference_ms_per_sentence": round(time_inference(predictor, sample), 3),
        "fit_seconds": round(fit_s, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if logger and hasattr(logger, "experiment"):
        metrics["wandb"] = log_to_wandb(logger, predictor, features["test"], ids["test"], bundle_dir, metrics)
    return metrics


def log_to_wandb(logger, predictor, test_features: dict, test_ids: np.ndarray, bundle_dir: Path, metrics: dict) -> dict:
    """Confusion matrix, summary numbers and the bundle as an artifact; returns the run's id and folder."""
    import torch
    import wandb

    from intentops.models.data import slice_batch

    run = logger.experiment
    with torch.inference_mode():
        logits = predictor.net(**slice_batch(test_features, np.arange(len(test_ids))))
    preds = logits.argmax(-1).numpy()
    run.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
        y_true=test_ids.tolist(), preds=preds.tolist(), class_names=predictor.labels)})
    run.summary.update({"test/accuracy": metrics["test"]["accuracy"], "size/params": metrics["size"]["params"],
                        "inference_ms_per_sentence": metrics["inference_ms_per_sentence"]})
    artifact = wandb.Artifact(f"intent-model-{run.id}", type="model", metadata={"model": metrics["model"]})
    artifact.add_dir(str(bundle_dir))
    run.log_artifact(artifact)
    info = {"run_id": run.id, "run_dir": str(Path(run.dir).parent), "mode": os.environ.get("WANDB_MODE", "")}
    run.finish()
    return info


@cli_entry
def main() -> None:
    cfg = load_params()
    paths = cfg.paths
    with atomic_path(paths.model_dir) as bundle_tmp, tempfile.TemporaryDirectory(prefix="intentops-train-") as work:
        metrics = train_from_config(cfg, bundle_tmp, Path(work))
    write_json(paths.train_metrics, metrics)
    log.info("train (%s): val accuracy %.4f, test accuracy %.4f, %d params, %.2f ms/sentence", metrics["model"],
             metrics["val"]["accuracy"], metrics["test"]["accuracy"], metrics["size"]["params"],
             metrics["inference_ms_per_sentence"])


if __name__ == "__main__":
    main()
