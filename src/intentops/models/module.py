"""The LightningModule: wraps any plain `nn.Module` classifier with one shared step for train/val/test."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

SPLITS = ("train", "val", "test")


class IntentClassifier(pl.LightningModule):
    """Cross-entropy training of `net`; logs "{split}/loss", "{split}/accuracy", "{split}/macro_f1".

    Args:
        net: maps a batch's feature tensors (keyword arguments) to logits (b, n_classes).
        n_classes: number of intents.
        optimizer: a partial taking the parameters (Hydra `_partial_: true`).
        label_smoothing: cross-entropy label smoothing.
        scheduler: "onecycle" or None; OneCycle needs the trainer's total step count.
    """

    def __init__(
        self,
        net: nn.Module,
        n_classes: int,
        optimizer: Callable,
        label_smoothing: float = 0.0,
        scheduler: str | None = "onecycle",
        warmup_fraction: float = 0.1,
    ):
        super().__init__()
        self.net, self.optimizer_fn = net, optimizer
        self.scheduler, self.warmup_fraction = scheduler, warmup_fraction
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        base = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes=n_classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes=n_classes, average="macro"),
            }
        )
        # One collection per split, so epoch-level values never mix splits.
        # ("train" itself would shadow nn.Module.train, hence the suffix.)
        self.metrics = nn.ModuleDict({f"{s}_metrics": base.clone(prefix=f"{s}/") for s in SPLITS})

    def forward(self, **features: torch.Tensor) -> torch.Tensor:
        return self.net(**features)

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        labels = batch["label"]
        logits = self(**{k: v for k, v in batch.items() if k != "label"})
        loss = self.loss_fn(logits, labels)
        metrics = self.metrics[f"{split}_metrics"]
        metrics.update(logits, labels)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split != "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def configure_optimizers(self):
        opt = self.optimizer_fn(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler != "onecycle":
            return opt
        max_lr = [g["lr"] for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=max_lr,
            total_steps=max(int(self.trainer.estimated_stepping_batches), 1),
            pct_start=self.warmup_fraction,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
