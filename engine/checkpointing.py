"""Checkpoints that survive preemption: written atomically, written mid-epoch when asked, written when
the scheduler sends SIGTERM, and read with a clear error when a file is damaged.

- AtomicCheckpointIO: every checkpoint Lightning writes goes to a temporary file in the same folder,
  fsync'd, then renamed onto its name. A kill or a full disk mid-write leaves the previous file whole
  (Lightning's own writer stages the bytes in the system's temporary folder, which on a cluster is
  often another file system: the final move is then a copy, not a rename).
- MidEpochCheckpoint: last.ckpt every `every_n_steps` steps and/or every `every_minutes` minutes of
  training; the data modules' resumable loaders make a resume from it exact (datamodules/base.py).
- LoaderPositionOnResume: the resumed loader continues where the checkpoint was taken (works around
  Lightning #20550).
- SaveOnSigterm: Lightning stops at the next batch boundary on SIGTERM (Kubernetes, torchrun's
  elastic agent and most schedulers send it) but saves nothing; this writes last.ckpt first.
- checkpoint_problem / newest_intact_checkpoint: what `train.py fit --ckpt_path last` checks before
  resuming.
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from engine.export import atomic_save

PREVIOUS = "previous.ckpt"  # last.ckpt's previous version, kept beside it


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose writes are atomic in the checkpoint's own folder (engine.export.atomic_save);
    before last.ckpt is replaced, its previous version is kept as previous.ckpt (a hard link where the
    file system has them, else a copy), the fallback when last.ckpt turns out damaged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        if path.name == "last.ckpt" and path.is_file():
            keep_previous(path, path.with_name(PREVIOUS))
        atomic_save(checkpoint, path)


def keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` a copy of `path`, atomically: a hard link (no bytes copied) renamed into place."""
    staged = previous.with_name(f".{previous.name}.staged")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:  # no hard links on this file system
        shutil.copy2(path, staged)
    os.replace(staged, previous)


class MidEpochCheckpoint(pl.Callback):
    """Write `<dirpath>/last.ckpt` every `every_n_steps` optimizer steps and/or every `every_minutes`
    minutes of training (None: that trigger off), only at the batch that ended an optimizer step: with
    gradient accumulation the batches between steps hold gradients no checkpoint keeps. Under DDP every
    rank takes part in the write; the clock of rank 0 decides, broadcast once per step only when
    `every_minutes` is set."""

    def __init__(
        self, dirpath: str | Path, every_n_steps: int | None = None, every_minutes: float | None = None
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1 or every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"every_n_steps must be >= 1 and every_minutes > 0, got {every_n_steps}, {every_minutes}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self._last_save = time.monotonic()
        self._step_seen = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save = time.monotonic()
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_seen:  # no optimizer step since the last batch (accumulating)
            return
        self._step_seen = trainer.global_step
        steps = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        minutes = False
        if self.every_minutes is not None:
            minutes = trainer.strategy.broadcast(time.monotonic() - self._last_save >= 60 * self.every_minutes)
        if steps or minutes:
            trainer.save_checkpoint(self.path)
            self._last_save = time.monotonic()


class LoaderPositionOnResume(pl.Callback):
    """Hands a resumed fit's stateful training loader (datamodules.base.ResumableLoader) its saved state.

    Lightning loads loader states only while it builds the train loader after the restore; a module
    whose configure_optimizers reads `trainer.estimated_stepping_batches` (OneCycleLR's total steps)
    builds it before, and the states are silently dropped (Lightning #20550, open). Here they are
    loaded at the start of training, and the loader's iterator is made again: a loader with workers
    drew its order when its first iterator was made."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if fit_loop.restarting and fit_loop._combined_loader_states_to_load:
            fit_loop._load_combined_loader_states()
            iter(fit_loop._data_fetcher)


class SaveOnSigterm(pl.Callback):
    """On SIGTERM, write `<dirpath>/last.ckpt` at the batch boundary where Lightning stops; the process
    then exits cleanly (status 0) and `--ckpt_path last` resumes from that step."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            pl.utilities.rank_zero_info(f"SIGTERM: saved {self.path} at step {trainer.global_step}; exiting")


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a checkpoint to resume from (missing, empty, truncated, not a torch zip, no
    Lightning state), or None when it reads back. Reads the whole file: a resume needs it anyway."""
    path = Path(path)
    if not path.is_file():
        return "it does not exist"
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return "it is not a torch checkpoint (truncated or overwritten: no zip directory at its end)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch raises, the answer is "damaged"
        return f"torch cannot read it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        return "it holds no Lightning training state (state_dict, loops)"
    return None


def newest_intact_checkpoint(folder: str | Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest (by modification time) `.ckpt` in `folder` that reads back, and why each newer one
    does not."""
    damaged: dict[Path, str] = {}
    for path in sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged[path] = problem
    return None, damaged
