"""What every script in benchmarks/ shares: time a span with the device synchronized only at its two
ends, name the device, and print one JSON line per measurement that says where and on what code it
was measured (benchmarks/run_all.py collects the lines into a table)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from engine.callbacks import ChannelsLast
from engine.export import device_name, environment_meta


def synchronize(device: torch.device) -> float:
    """Wait for the device's queued work, then read the clock (seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(run: Callable[[int], object], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for run(warmup), ..., run(warmup + steps - 1) after `warmup` untimed calls; the device is
    synchronized before the first timed call and after the last, never in between."""
    for step in range(warmup):
        run(step)
    started = synchronize(device)
    for step in range(warmup, warmup + steps):
        run(step)
    return synchronize(device) - started


class _Clock(pl.Callback):
    """Synchronized clock readings at the first timed step and at the end of the fit."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.stopped = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.started = synchronize(pl_module.device)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stopped = synchronize(pl_module.device)


def lightning_fit_seconds(
    module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, precision: str, steps: int, warmup: int
) -> float:
    """Seconds of `steps` training steps of `module` under Lightning after `warmup` ones, on one batch
    (x, y) resident on its device: the Trainer with ChannelsLast in `precision`, no logger, checkpoints,
    progress bar or validation."""
    batches = DataLoader(range(warmup + steps), batch_size=1, collate_fn=lambda _: (x, y))
    clock = _Clock(warmup)
    trainer = pl.Trainer(
        accelerator=x.device.type,
        devices=1,
        max_steps=warmup + steps,
        precision=precision,
        callbacks=[ChannelsLast(), clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=batches)
    return clock.stopped - clock.started


def emit(benchmark: str, device: torch.device, **measurement: Any) -> dict[str, Any]:
    """Print one measurement as a JSON line: the benchmark, the device, the measurement's fields and
    the code (commit, torch, Lightning); return it."""
    line = {"benchmark": benchmark, "device": device_name(device), **measurement, **environment_meta()}
    print(json.dumps(line), flush=True)
    return line
