"""eval.py's journal: every finished row goes to <out>/rows/ the moment it finishes, and every attacked
batch of a long row to <out>/rows/batches/<row>/ (until its row is kept), so a killed evaluation loses at
most the batch it was attacking, and `--resume` picks up from there. A kill between keeping a row and
removing its batches leaves them behind; the folder per row is what lets a resume tell them apart.

<out>/rows/run.json holds what the rows depend on (the arguments that change a number, the commit,
the hash of the image indices); a resume with anything else is refused with the difference. A row's
random draws are keyed by what the row is and a batch's by its index, not by when they run
(evaluation/runner.py), so the rows and batches a resumed run computes equal those of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.errors import InputError
from engine.export import atomic_save, atomic_write_bytes
from evaluation.runner import Row, Skipped, computed_batch, text_key

FOLDER = "rows"
RUN = "run.json"
BATCHES = "batches"


class JournalMismatch(InputError):
    """--resume met rows of another evaluation."""


class RowJournal:
    """Rows by key in `folder`: `row(key, compute)` returns the stored row, or computes and stores it.

    fingerprint: JSON values that decide the numbers. A fresh journal writes it; with `resume`, the
    stored one must be equal (JournalMismatch names each difference). batch_seconds: the attacked
    batches that take at least this long are kept too (`batches`, emptied whenever a row is kept)."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], resume: bool, batch_seconds: float) -> None:
        self.folder = folder
        self.loaded = 0
        self.batches = BatchJournal(folder / BATCHES, batch_seconds)
        stored = folder / RUN
        if resume:
            if not stored.is_file():
                raise JournalMismatch(f"nothing to resume in '{folder.parent}': no {FOLDER}/{RUN} (not an eval.py run)")
            differences = _differences(json.loads(stored.read_text()), fingerprint)
            if differences:
                raise JournalMismatch(
                    f"refusing to resume '{folder.parent}': its rows were made by another evaluation ("
                    + "; ".join(differences)
                    + "). Rerun that command with --resume, or evaluate into a new --out."
                )
        else:  # --overwrite: the old run's rows and batches must not be taken for this one's
            for old in folder.glob("*.pt"):
                old.unlink()
            shutil.rmtree(self.batches.folder, ignore_errors=True)
        atomic_write_bytes(json.dumps(fingerprint, indent=1).encode(), stored)

    def row(self, key: tuple, compute: Callable[[], Row | Skipped]) -> Row | Skipped:
        name = f"{text_key(*key):08x}"
        path = self.folder / f"{name}.pt"
        if path.is_file():
            self.loaded += 1
            self.batches.clear(name)  # left behind when a kill came between keeping the row and this
            return Row(**torch.load(path, map_location="cpu", weights_only=True))
        self.batches.row = name
        result = compute()
        if isinstance(result, Row):
            atomic_save(dataclasses.asdict(result), path)
            self.batches.clear(name)  # the row holds them now
        return result


class BatchJournal:
    """The attacked batches of the row being computed (`row`, its journal name), in `folder`/`row`:
    `batch(key, index, compute)` returns (x_adv, seconds), read back when stored, else computed and
    stored if it took >= `min_seconds` (a fast row is not worth the disk traffic: it is recomputed instead)."""

    def __init__(self, folder: Path, min_seconds: float) -> None:
        self.folder = folder
        self.min_seconds = min_seconds
        self.loaded = 0
        self.row = ""

    def batch(self, key: int, index: int, compute: Callable[[], Tensor]) -> tuple[Tensor, float]:
        path = self.folder / self.row / f"{key:08x}-{index:06d}.pt"
        if path.is_file():
            self.loaded += 1
            stored = torch.load(path, map_location="cpu", weights_only=True)
            return stored["x_adv"], stored["seconds"]
        x_adv, seconds = computed_batch(key, index, compute)
        if seconds >= self.min_seconds:
            atomic_save({"x_adv": x_adv.cpu(), "seconds": seconds}, path)
        return x_adv, seconds

    def clear(self, row: str) -> None:
        """Remove the batches of the row named `row` (its row file holds them)."""
        shutil.rmtree(self.folder / row, ignore_errors=True)


def _differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {stored.get(key)!r} then, {now.get(key)!r} now"
        for key in sorted(set(stored) | set(now))
        if stored.get(key) != now.get(key)
    ]
