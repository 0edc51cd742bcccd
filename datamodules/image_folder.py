"""ImageFolder trees (root/<split>/<class>/<image>): small ones decoded into memory, large
ones (ImageNet) streamed through loader workers."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from datamodules.base import DataNotFoundError, ImageSplit, Split, TensorImageDataModule, to_unit_float, train_loader
from datamodules.registry import register_data_set
from datamodules.subset import hold_out
from engine.errors import InputError
from engine.export import atomic_save

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def folder_classes(split_dir: Path) -> tuple[str, ...]:
    """Sorted class folder names of one split, as torchvision's ImageFolder orders them."""
    if not split_dir.is_dir():
        raise DataNotFoundError(
            f"no ImageFolder split at '{split_dir}': expected '{split_dir}/<class>/<image>' folders"
        )
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    if not classes:
        raise DataNotFoundError(f"'{split_dir}' has no class folders: expected '{split_dir}/<class>/<image>'")
    return classes


class UnreadableImageError(InputError):
    """An image file of a data set cannot be decoded."""


def _read_rgb(path: Path) -> Tensor:
    try:
        with Image.open(path) as image:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    except (OSError, SyntaxError) as broken:  # PIL: not an image, truncated, damaged header
        raise UnreadableImageError(
            f"'{path}' is not a readable image ({type(broken).__name__}: {broken}); replace or remove it"
        ) from broken


def _listing(split_dir: Path, class_names: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    """The image files of split_dir/<class>/ in sorted order within each class, and their labels."""
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += class_files
        labels += [label] * len(class_files)
    if not files:
        raise DataNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under '{split_dir}/<class>/'")
    return files, labels


def _fingerprint(split_dir: Path, files: list[Path], labels: list[int]) -> str:
    """Changes when any file is added, removed, renamed, relabelled, resized or rewritten."""
    digest = hashlib.sha256()
    for path, label in zip(files, labels):
        status = path.stat()
        digest.update(f"{path.relative_to(split_dir)}|{label}|{status.st_size}|{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decode_image_folder(split_dir: Path, class_names: tuple[str, ...], cache: bool = True) -> ImageSplit:
    """Decode every image of `split_dir/<class>/` into one uint8 (N,3,H,W) tensor.

    Files are taken in sorted order within each class; all images must share one size. With
    `cache`, the decoded split is kept in `split_dir/../.decoded/<split>-<fingerprint>.pt` and read
    from there while the tree is unchanged: decoding CIFAR-10's 60,000 JPEGs takes 10-20 s per
    process, a run of several stages pays it once. A tree that cannot be written to is decoded
    every time.
    """
    files, labels = _listing(split_dir, class_names)
    cached = split_dir.parent / ".decoded" / f"{split_dir.name}-{_fingerprint(split_dir, files, labels)}.pt"
    if cache and cached.is_file():
        with contextlib.suppress(Exception):  # a damaged cache is decoded again and rewritten
            stored = torch.load(cached, map_location="cpu", weights_only=True)
            return ImageSplit(stored["images"], stored["labels"])
    images = [_read_rgb(path) for path in files]  # ~0.12 ms per CIFAR JPEG on one core
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise InputError(
            f"images under '{split_dir}' differ in size ({sorted(sizes)[:3]}...): decode them into "
            "memory only when all have one size, or use ImageFolderStream, which resizes"
        )
    split = ImageSplit(torch.stack(images), torch.tensor(labels, device="cpu"))
    if cache:
        with contextlib.suppress(OSError):  # a read-only tree: no cache, same result
            atomic_save({"images": split.images, "labels": split.labels}, cached)
    return split


@register_data_set("folder")
class ImageFolderTensors(TensorImageDataModule):
    """A small ImageFolder tree of equal-sized RGB images, decoded once into memory.

    root holds train/<class>/ and test/<class>/ (or val/<class>/); cache_decoded: keep the decoded
    splits beside the tree (decode_image_folder).
    """

    def __init__(self, root: str, image_size: int = 32, cache_decoded: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.class_names = folder_classes(self.root / "train")
        self.image_size = image_size
        self.cache_decoded = cache_decoded

    def load_split(self, split: Split) -> ImageSplit:
        split_dir = self.root / "train" if split == "train" else _eval_dir(self.root)
        decoded = decode_image_folder(split_dir, self.class_names, self.cache_decoded)
        if decoded.images.shape[-1] != self.image_size:
            raise InputError(
                f"images under '{split_dir}' are {decoded.images.shape[-1]} px, not image_size={self.image_size}: "
                "set data.init_args.image_size to their size"
            )
        return decoded


def _eval_dir(root: Path) -> Path:
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    raise DataNotFoundError(
        f"no evaluation split under '{root}': expected '{root}/test/<class>/' or '{root}/val/<class>/'"
    )


class ImageFolderStream(pl.LightningDataModule):
    """A large ImageFolder tree (e.g. ImageNet: root/train/<wnid>/, root/val/<wnid>/) read by
    loader workers: random-resized crop and flip for training, resize + centre crop otherwise.
    Batches reach the model as (x: (N,3,S,S) float in [0,1], y: (N,) int64).

    The shuffle order is f(seed, epoch) as for the in-memory sets; the crops are drawn in the
    workers, so a resumed run's augmentation differs from an uninterrupted one. As for the
    in-memory sets, validation is a class-balanced subset of `val_images` training images (drawn
    from `val_seed`, evaluated with the test transform, removed from training); the tree's
    test/ or val/ folder is the test split, read only by `train.py test` and eval.py.
    """

    channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        resize_size: int = 256,
        batch_size: int = 256,
        eval_batch_size: int = 256,
        num_workers: int = 8,
        seed: int = 0,
        val_images: int = 10000,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.class_names = folder_classes(self.root / "train")
        self.image_size = image_size
        self.resize_size = resize_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_images = val_images
        self.val_seed = val_seed
        self.datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        train = transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ]
        )
        evaluate = transforms.Compose(
            [
                transforms.Resize(self.resize_size),
                transforms.CenterCrop(self.image_size),
                transforms.PILToTensor(),
            ]
        )
        if stage in (None, "fit", "validate") and "train" not in self.datasets:  # one scan of a large tree
            self._carve_validation(train, evaluate)
        if stage in (None, "test", "predict") and "test" not in self.datasets:
            self.datasets["test"] = datasets.ImageFolder(str(_eval_dir(self.root)), transform=evaluate)

    def _carve_validation(self, train: transforms.Compose, evaluate: transforms.Compose) -> None:
        training = datasets.ImageFolder(str(self.root / "train"), transform=train)
        labels = torch.tensor(training.targets, dtype=torch.int64, device="cpu")
        kept, held_out = hold_out(labels, self.val_images, self.val_seed, f"'{self.root}/train'")
        self.datasets["train"] = Subset(training, kept.tolist())
        if self.val_images:
            validation = copy.copy(training)  # the same file list (one scan of the tree), the test transform
            validation.transform = evaluate
            self.datasets["val"] = Subset(validation, held_out.tolist())

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        options: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }
        if split == "train":
            return train_loader(self, self.datasets["train"], batch_size, self.seed, **options)
        return DataLoader(self.datasets[split], batch_size=batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size) if self.val_images else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return to_unit_float(images), labels
