"""Callbacks: engineering that stays out of the research modules."""

from __future__ import annotations

import time
from typing import Any

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
        self._start = 0.0
        self._images = 0
        self._seconds = None

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._now(pl_module)
        self._images = 0
        self._seconds = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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

    def __init__(self, path: str | None = None) -> None:
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


class RestorerEMA(pl.Callback):
    """Exponential moving average of `pl_module.restorer`'s weights, and only of those: the frozen
    classifier is neither copied nor saved twice (Lightning's EMAWeightAveraging copies the whole
    module). Validation and testing run on the averaged weights; when training ends they replace the live
    ones, so the export written at the end of fit holds them. The average is kept in the
    checkpoint's callback state: a resumed run continues it exactly.

    Args:
        decay: weight of the old average per optimizer step, once warmed up: step t uses
            min(decay, (1 + t) / (10 + t)), so that short runs are not averaged with the
            random initial weights (the warm-up of TensorFlow's ExponentialMovingAverage).
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.average: dict[str, torch.Tensor] | None = None
        self._last_step = -1

    @staticmethod
    def _floats(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v for k, v in pl_module.restorer.state_dict().items() if v.is_floating_point()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        live = self._floats(pl_module)
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in live.items()}
        else:  # restored from a checkpoint: move next to the weights
            self.average = {k: self.average[k].to(v.device) for k, v in live.items()}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = trainer.global_step
        step = trainer.global_step
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        live = self._floats(pl_module)
        torch._foreach_lerp_(list(self.average.values()), [live[k].detach() for k in self.average], weight)

    def _swap(self, pl_module: pl.LightningModule) -> None:
        live = self._floats(pl_module)
        for key, average in self.average.items():
            held = live[key].detach().clone()
            live[key].data.copy_(average)
            average.copy_(held)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.average is not None:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.average is not None:
            self._swap(pl_module)

    # `train.py test --ckpt_path ...` restores the average too: test it, as validation does.
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        live = self._floats(pl_module)
        for key, average in self.average.items():
            live[key].data.copy_(average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average = state_dict["average"]
        self._last_step = state_dict["last_step"]
