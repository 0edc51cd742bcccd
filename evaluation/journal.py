"""eval.py's journal: every finished row goes to <out>/rows/ the moment it finishes, so a killed
evaluation loses at most the row it was computing, and `--resume` picks up from there.

<out>/rows/run.json holds what the rows depend on (the arguments that change a number, the commit,
the hash of the image indices); a resume with anything else is refused with the difference. A row's
random draws are keyed by what the row is, not by when it runs (evaluation/runner.py), so the rows a
resumed run computes equal those of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.export import atomic_save, atomic_write_bytes
from evaluation.runner import Row, Skipped, text_key

FOLDER = "rows"
RUN = "run.json"


class JournalMismatch(ValueError):
    """--resume met rows of another evaluation."""


class RowJournal:
    """Rows by key in `folder`: `row(key, compute)` returns the stored row, or computes and stores it.

    fingerprint: JSON values that decide the numbers. A fresh journal writes it; with `resume`, the
    stored one must be equal (JournalMismatch names each difference)."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], resume: bool) -> None:
        self.folder = folder
        self.loaded = 0
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
        else:
            for old in folder.glob("*.pt"):  # --overwrite: the old run's rows must not be taken for this one's
                old.unlink()
        atomic_write_bytes(json.dumps(fingerprint, indent=1).encode(), stored)

    def row(self, key: tuple, compute: Callable[[], Row | Skipped]) -> Row | Skipped:
        path = self.folder / f"{text_key(*key):08x}.pt"
        if path.is_file():
            self.loaded += 1
            return Row(**torch.load(path, map_location="cpu", weights_only=True))
        result = compute()
        if isinstance(result, Row):
            atomic_save(dataclasses.asdict(result), path)
        return result


def _differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {stored.get(key)!r} then, {now.get(key)!r} now"
        for key in sorted(set(stored) | set(now))
        if stored.get(key) != now.get(key)
    ]
