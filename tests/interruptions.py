"""Callbacks that interrupt a `train.py fit` subprocess the way a cluster does, for tests/test_resume.py.
Added on the command line: --trainer.callbacks+='{"class_path": "tests.interruptions.KillAtStep", ...}'."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Sends `signal_name` (e.g. SIGKILL, SIGTERM) to this process when training step `step` has ended,
    before the checkpoint callbacks of that step run."""

    def __init__(self, step: int, signal_name: str) -> None:
        self.step = step
        self.signal = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
