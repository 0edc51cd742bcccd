"""The evaluation subset: a stored, class-balanced list of test-set indices and its hash.

Image-folder test sets are sorted by class, so "the first 1000 images" of CIFAR-10 are all
airplanes. Every evaluation draws n // K images per class (the remainder going to the classes
that come first in a seeded order), stores the list beside its results and records its hash;
two results with the same hash were measured on the same images.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.seeding import seeded_generator


def balanced_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """n indices into `labels` ((N,) int64), as equal per class as possible, sorted ascending."""
    classes = labels.unique()
    if n < 1 or n > len(labels):
        raise ValueError(f"n must be in 1..{len(labels)} (the test split's size), got {n}")
    generator = seeded_generator("cpu", seed)
    quota = torch.full((len(classes),), n // len(classes), device="cpu")
    quota[torch.randperm(len(classes), generator=generator, device="cpu")[: n % len(classes)]] += 1
    chosen = []
    for label, count in zip(classes.tolist(), quota.tolist()):
        members = (labels == label).nonzero().flatten()
        if count > len(members):
            raise ValueError(f"class {label} has {len(members)} test images, fewer than the {count} a balanced n={n} needs")
        chosen.append(members[torch.randperm(len(members), generator=generator, device="cpu").to(members.device)[:count]])
    return torch.cat(chosen).sort().values


def index_hash(dataset: str, indices: Tensor) -> str:
    """sha256 (first 16 hex digits) of the data set's name and the index list."""
    text = dataset + ":" + ",".join(map(str, indices.tolist()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def index_record(dataset: str, indices: Tensor, seed: int) -> dict[str, Any]:
    return {"dataset": dataset, "split": "test", "seed": seed, "hash": index_hash(dataset, indices), "indices": indices.tolist()}


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
