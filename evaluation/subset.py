"""The evaluation subset's record: the class-balanced list of test-set indices an evaluation used
(drawn by datamodules.subset.balanced_indices), stored beside its results with its hash; two
results with the same hash were measured on the same images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def index_hash(dataset: str, indices: Tensor) -> str:
    """sha256 (first 16 hex digits) of the data set's name and the index list."""
    text = dataset + ":" + ",".join(map(str, indices.tolist()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def index_record(dataset: str, indices: Tensor, seed: int) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "split": "test",
        "seed": seed,
        "hash": index_hash(dataset, indices),
        "indices": indices.tolist(),
    }


def read_index_record(path: str | Path, dataset: str, split_size: int) -> Tensor:
    """The indices of a stored list; refuses a list of another data set or a damaged one."""
    record = json.loads(Path(path).read_text())
    if record.get("dataset") != dataset:
        raise ValueError(f"'{path}' lists images of {record.get('dataset')!r}, not {dataset!r}")
    indices = torch.tensor(record["indices"], dtype=torch.int64, device="cpu")
    if record.get("hash") != index_hash(dataset, indices):
        raise ValueError(f"'{path}': the index list does not match its recorded hash; it was edited or damaged")
    if len(indices) and (indices.min() < 0 or indices.max() >= split_size):
        raise ValueError(f"'{path}' has indices outside the test split of {split_size} images")
    return indices
