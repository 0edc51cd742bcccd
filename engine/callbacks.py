"""Callbacks: engineering that stays out of the research modules."""
from __future__ import annotations

import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from engine.export import atomic_save, git_commit


class ChannelsLast(pl.Callback):
    """Put the module's 4-D weights in channels_last layout before training: convolutions then
    run in NHWC (tensor cores' native layout) and produce channels_last outputs; the first
    convolution converts the input batch itself, so data modules need not."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


class TrainThroughput(pl.Callback):
    """Logs `perf/train_img_per_s`: training images per second over each epoch's training
    batches, summed over ranks, validation excluded. The clock is read after a device
    synchronization at the epoch's start and end only, never inside the step loop."""

    def __init__(self) -> None:
        self._start, self._images, self._seconds = 0.0, 0, None

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._images, self._seconds = self._now(pl_module), 0, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch[0])

    def _stop(self, pl_module: pl.LightningModule) -> None:
        if self._seconds is None:
            self._seconds = self._now(pl_module) - self._start

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._stop(pl_module)  # validation inside fit: the epoch's training part has ended

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(pl_module)
        rate = self._images * trainer.world_size / max(self._seconds, 1e-9)
        pl_module.log("perf/train_img_per_s", rate, on_epoch=True, rank_zero_only=True)


class ExportOnFitEnd(pl.Callback):
    """At the end of a completed fit, write the module's export file (see engine.export) to
    `path` (train.py sets it to <run.export_dir>/<run.name>.pt). Rank 0 writes it, atomically;
    an interrupted fit writes nothing. The module provides `to_export(meta) -> dict`.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self._commit = "unknown"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The commit of the code that runs, read now: by the end of a long run HEAD may have moved.
        self._commit = git_commit()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path is None or not trainer.is_global_zero:
            return
        meta: dict[str, Any] = {
            "commit": self._commit,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "data": type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
            "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
        }
        atomic_save(pl_module.to_export(meta), self.path)
        rank_zero_info(f"Exported {type(pl_module).__name__} to {self.path}")
