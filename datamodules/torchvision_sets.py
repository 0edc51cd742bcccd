"""CIFAR-10, SVHN, Fashion-MNIST and STL10 as in-memory uint8 splits.

Each reads torchvision's on-disk format under `root` (and downloads it there when
`download: true` and the machine is online). CIFAR-10 also reads an ImageFolder tree
root/train/<class>/, root/test/<class>/ such as the JPEG release of ../shared/data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import datasets

from datamodules.base import DataNotFoundError, ImageSplit, Split, TensorImageDataModule
from datamodules.image_folder import decode_image_folder, folder_classes
from datamodules.registry import register_data_set
from engine.errors import InputError


def open_torchvision(name: str, factory: Callable[..., Any], root: Path, download: bool, expected: str) -> Any:
    """Open a torchvision data set from `root`, downloading only when asked; clear errors offline.

    factory(download=...) builds the torchvision data set; `expected` names its files.
    """
    try:
        return factory(download=False)
    except RuntimeError as missing:  # torchvision: "Dataset not found or corrupted"
        if not download:
            raise DataNotFoundError(
                f"{name} not found: expected {expected} under '{root}'. Put the files there, or set "
                f"`download: true` in the data config to fetch them (needs internet)."
            ) from missing
    try:
        return factory(download=True)
    except (OSError, RuntimeError) as failed:  # URLError is an OSError
        raise DataNotFoundError(
            f"could not download {name} into '{root}' ({failed}). Offline? Copy {expected} there "
            "from a machine that has them and set `download: false`."
        ) from failed


@register_data_set("cifar10")
class CIFAR10(TensorImageDataModule):
    """CIFAR-10, 32x32 RGB, 10 classes: 50,000 training and 10,000 test images.

    root holds either an ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg; e.g.
    `mkdir -p data/cifar10 && tar -xzf ../shared/data/cifar10-jpg.tar.gz -C data/cifar10`)
    or torchvision's cifar-10-batches-py/ folder. cache_decoded: keep the tree's decoded splits
    in root/.decoded/ (datamodules.image_folder.decode_image_folder), so later processes skip
    the 10-20 s of JPEG decoding.
    """

    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def __init__(
        self, root: str = "data/cifar10", download: bool = False, cache_decoded: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.download = download
        self.cache_decoded = cache_decoded

    def load_split(self, split: Split) -> ImageSplit:
        if (self.root / "train").is_dir():
            found = folder_classes(self.root / "train")
            if found != self.class_names:
                raise InputError(
                    f"'{self.root}/train' has classes {found}, not CIFAR-10's {self.class_names}: "
                    "point data.init_args.root at a CIFAR-10 tree, or read this one with ImageFolderTensors"
                )
            return decode_image_folder(self.root / split, self.class_names, self.cache_decoded)
        dataset = open_torchvision(
            "CIFAR-10",
            lambda download: datasets.CIFAR10(str(self.root), train=split == "train", download=download),
            self.root,
            self.download,
            "an ImageFolder tree train/<class>/ + test/<class>/ (the JPEG tarball, extracted) or cifar-10-batches-py/",
        )
        return ImageSplit(
            torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets, device="cpu")
        )


@register_data_set("svhn")
class SVHN(TensorImageDataModule):
    """Street View House Numbers, 32x32 RGB digits: 73,257 training and 26,032 test images.

    torchvision's train_32x32.mat / test_32x32.mat under root. Flips are off by default: a
    mirrored digit is not the same digit.
    """

    class_names = tuple(str(d) for d in range(10))

    def __init__(self, root: str = "data/svhn", download: bool = False, flip: bool = False, **kwargs: Any) -> None:
        super().__init__(flip=flip, **kwargs)
        self.root = Path(root)
        self.download = download

    def load_split(self, split: Split) -> ImageSplit:
        dataset = open_torchvision(
            "SVHN",
            lambda download: datasets.SVHN(str(self.root), split=split, download=download),
            self.root,
            self.download,
            f"{split}_32x32.mat",
        )
        return ImageSplit(torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels.astype(np.int64)))


@register_data_set("fashion_mnist")
class FashionMNIST(TensorImageDataModule):
    """Fashion-MNIST, 28x28 greyscale, 10 classes: 60,000 training and 10,000 test images.

    Images keep their one channel by default (channels=1): classifiers are then built with one
    input channel, and restorers see (N,1,28,28). `as_rgb: true` repeats the channel three
    times for models that need RGB (e.g. ImageNet-pretrained timm models, or defenses that
    work in YCbCr).
    """

    class_names = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
    image_size = 28

    def __init__(
        self,
        root: str = "data/fashion_mnist",
        download: bool = False,
        as_rgb: bool = False,
        crop_padding: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(crop_padding=crop_padding, **kwargs)
        self.root = Path(root)
        self.download = download
        self.as_rgb = as_rgb
        self.channels = 3 if as_rgb else 1

    def load_split(self, split: Split) -> ImageSplit:
        dataset = open_torchvision(
            "Fashion-MNIST",
            lambda download: datasets.FashionMNIST(str(self.root), train=split == "train", download=download),
            self.root,
            self.download,
            "FashionMNIST/raw/*-ubyte",
        )
        images = dataset.data[:, None]
        return ImageSplit(images.expand(-1, self.channels, -1, -1).contiguous(), dataset.targets)


@register_data_set("stl10")
class STL10(TensorImageDataModule):
    """STL-10, 96x96 RGB, 10 classes: the 5,000 labelled training and 8,000 test images
    (torchvision's stl10_binary/ under root; the unlabelled split is not used). 500 of the
    labelled training images are held out for validation by default (5,000 would be all of them)."""

    class_names = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
    image_size = 96

    def __init__(
        self,
        root: str = "data/stl10",
        download: bool = False,
        crop_padding: int = 12,
        val_images: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(crop_padding=crop_padding, val_images=val_images, **kwargs)
        self.root = Path(root)
        self.download = download

    def load_split(self, split: Split) -> ImageSplit:
        dataset = open_torchvision(
            "STL10",
            lambda download: datasets.STL10(str(self.root), split=split, download=download),
            self.root,
            self.download,
            "stl10_binary/",
        )
        return ImageSplit(torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels.astype(np.int64)))
