"""Small data sets written in the on-disk formats torchvision reads (SVHN's .mat, Fashion-MNIST's
idx files, STL10's binaries) and a small CIFAR-10 tree of the real JPEGs, for tests of the data
modules and of every config on a GPU, where the real files are absent.

torchvision checks the md5 of the official SVHN and STL10 files; `accept_written_files` lets it
read these instead (the format is checked by reading it back, tests/test_datamodules.py).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torchvision import datasets

from datamodules import render_shapes


def shapes_split(count: int, seed: int, size: int, channels: int) -> tuple[Tensor, Tensor]:
    """(images (N,channels,size,size) uint8, labels (N,) int64): the embedded shapes, as stand-in content."""
    images, labels = render_shapes(count, seed, image_size=size)
    if channels == 1:
        images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return images, labels


def write_svhn(root: Path, split: str, images: Tensor, labels: Tensor) -> None:
    """root/<split>_32x32.mat: X (32,32,3,N) uint8, y (N,1) with digit 0 stored as 10, as SVHN ships it."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    digits = np.where(labels.numpy() == 0, 10, labels.numpy()).astype(np.uint8).reshape(-1, 1)
    savemat(root / f"{split}_32x32.mat", {"X": images.permute(2, 3, 1, 0).numpy(), "y": digits})


def write_fashion_mnist(root: Path, split: str, images: Tensor, labels: Tensor) -> None:
    """root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (big-endian idx files)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    count, _, height, width = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">iiii", 2051, count, height, width) + images[:, 0].numpy().tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">ii", 2049, count) + labels.numpy().astype(np.uint8).tobytes()
    )


def write_stl10(root: Path, split: str, images: Tensor, labels: Tensor) -> None:
    """root/stl10_binary/<split>_X.bin (column-major 3x96x96 per image) and <split>_y.bin (labels 1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(images.permute(0, 1, 3, 2).contiguous().numpy().tobytes())
    (folder / f"{split}_y.bin").write_bytes((labels.numpy() + 1).astype(np.uint8).tobytes())


WRITERS = {"svhn": (write_svhn, 32, 3), "fashion_mnist": (write_fashion_mnist, 28, 1), "stl10": (write_stl10, 96, 3)}


def write_data_set(name: str, root: Path, train: int, test: int, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Write `name` (a key of WRITERS) under root with shapes content; returns the splits written."""
    write, size, channels = WRITERS[name]
    splits = {"train": shapes_split(train, seed, size, channels), "test": shapes_split(test, seed + 1, size, channels)}
    for split, (images, labels) in splits.items():
        write(root, split, images, labels)
    return splits


@contextlib.contextmanager
def accept_written_files() -> Iterator[None]:
    """Let torchvision read SVHN and STL10 files that exist but are not the official ones (md5)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            datasets.SVHN, "_check_integrity", lambda self: os.path.isfile(os.path.join(self.root, self.filename))
        )
        patch.setattr(
            datasets.STL10, "_check_integrity", lambda self: os.path.isdir(os.path.join(self.root, self.base_folder))
        )
        yield


def cifar_subset_tree(tree: Path, out: Path, train_per_class: int, test_per_class: int) -> Path:
    """A CIFAR-10 JPEG tree with the first images of each class of `tree` (linked, not copied)."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted((tree / split).iterdir()):
            target = out / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:count]:
                with contextlib.suppress(FileExistsError):
                    (target / image.name).symlink_to(image)
    return out
