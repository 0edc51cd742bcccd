"""One data interface for every small image data set: uint8 splits, batches as [0,1] floats.

A data set is two uint8 tensors per split, images (N,C,H,W) and labels (N,). The loader hands
over either uint8 image batches (`on_device=False`, the usual pinned-memory path) or only
indices into the split (`on_device=True`: the whole split lives on the model's device and the
batch is gathered there, so the GPU never waits on loader workers). In both modes the batch is
augmented on the device in `on_after_batch_transfer` and reaches the model as
(x: (N,C,H,W) float32 in [0,1], y: (N,) int64). Normalization belongs to the classifier.

Everything random is a function of (seed, epoch, index): the shuffle order is a
`DistributedSampler` permutation (sharded across ranks under DDP) and each image's crop offset and
flip are drawn per epoch from the seed. The training loader (ResumableLoader) also saves how many
batches of its epoch training has taken, so a run resumed from any step, at an epoch boundary or
mid-epoch, sees exactly the batches an uninterrupted run would, without any RNG state in the checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.subset import hold_out
from engine.errors import InputError
from engine.seeding import seeded_generator

Split = Literal["train", "test"]


class DataNotFoundError(InputError, FileNotFoundError):
    """The data set's files are not where they were expected; the message says what to do."""


@dataclasses.dataclass
class ImageSplit:
    """images: (N,C,H,W) uint8; labels: (N,) int64."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be (N,C,H,W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be ({len(self.images)},), got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(x (n,C,H,W) float32 in [0,1], y (n,) int64) at `indices`, as a loader's batch of them
        reaches the models."""
        return to_unit_float(self.images[indices]), self.labels[indices]


@dataclasses.dataclass
class SplitBatch:
    """What the loaders yield: indices into a split, plus the uint8 images and labels unless
    the split is resident on the device (then they are gathered after the transfer)."""

    split: str
    indices: Tensor
    images: Tensor | None = None
    labels: Tensor | None = None

    def pin_memory(self) -> SplitBatch:
        pinned = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return SplitBatch(**{k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in pinned.items()})


def _keep_as_is(batch: SplitBatch) -> SplitBatch:
    return batch


class _SplitDataset(Dataset):
    """Batched access to a split (`__getitems__`): one tensor gather per batch, not per image."""

    def __init__(self, name: str, split: ImageSplit, indices_only: bool) -> None:
        self.name = name
        self.split = split
        self.indices_only = indices_only

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitems__(self, indices: list[int]) -> SplitBatch:
        index = torch.tensor(indices, dtype=torch.long, device="cpu")
        if self.indices_only:
            return SplitBatch(self.name, index)
        return SplitBatch(self.name, index, self.split.images[index], self.split.labels[index])

    def __getitem__(self, index: int) -> SplitBatch:
        return self.__getitems__([index])


def crop_and_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Random-crop-with-zero-padding and horizontal flip, one gather for the whole batch.

    images: (N,C,H,W) any dtype; offsets: (N,2) int64 in [0, 2*padding] (row, column) into the
    padded image; flips: (N,) bool. Returns (N,C,H,W), same dtype and device.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)
    columns = torch.arange(w, device=images.device).expand(n, w)
    columns = torch.where(flips[:, None], w - 1 - columns, columns) + offsets[:, 1:]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)


class ResumableSampler(DistributedSampler):
    """The training order: a DistributedSampler permutation, f(seed, epoch), sharded over the ranks; and
    where a run stopped mid-epoch, the rest of that epoch's order.

    `resume_at(epoch, batches)` (from a checkpoint, through ResumableLoader) makes the next pass over
    that epoch skip its first `batches` batches of `batch_size`; a state at an epoch's end moves on to
    the next epoch. The epoch is set there too, since a loader with workers draws its order when its
    iterator is made, which Lightning does before it calls set_epoch.
    """

    def __init__(self, num_images: int, num_replicas: int, rank: int, seed: int, batch_size: int) -> None:
        super().__init__(range(num_images), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.skip: tuple[int, int] | None = None  # (epoch, batches to skip in it), used once

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def resume_at(self, epoch: int, batches: int) -> None:
        finished = batches >= self.batches_per_epoch
        self.set_epoch(epoch + 1 if finished else epoch)
        self.skip = None if finished else (epoch, batches)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        skip, self.skip = self.skip, None
        start = skip[1] * self.batch_size if skip is not None and skip[0] == self.epoch else 0
        return iter(order[start:])


class ResumableLoader(DataLoader):
    """The training loader, stateful in Lightning's sense: Lightning saves its `state_dict()` in every
    checkpoint of a fit and hands it to `load_state_dict()` when the run resumes. The state is the epoch
    and how many of its batches training has taken (Lightning's own count: its loader prefetches, so
    ours would run ahead); the sampler then resumes after them. Set `trainer` before the fit."""

    trainer: pl.Trainer | None = None

    def state_dict(self) -> dict[str, int]:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.ready}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self.sampler.resume_at(state["epoch"], state["batches"])


def train_loader(
    datamodule: pl.LightningDataModule, dataset: Dataset, batch_size: int, seed: int, **options
) -> ResumableLoader:
    """The training loader of `dataset`: ResumableSampler's order (a DistributedSampler also with one
    process: Lightning keeps a loader's own DistributedSampler and calls its set_epoch every epoch),
    resumable mid-epoch."""
    trainer = datamodule.trainer
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(len(dataset), world_size, rank, seed, batch_size)
    loader = ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, **options)
    loader.trainer = trainer
    return loader


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 (N,C,H,W) in [0,255] -> float32 (N,C,H,W) in [0,1]."""
    return images.float().div_(255.0)


class TensorImageDataModule(pl.LightningDataModule):
    """Base of the in-memory data sets. Subclasses set `class_names`, `channels`, `image_size`
    and implement `load_split`.

    Three splits: `train` and `val` are carved from the data set's training split (`val` is a
    seeded, class-balanced subset of `val_images` images, removed from `train`), `test` is the data
    set's test split. Everything that selects (the best checkpoint, early stopping, defense settings)
    sees `val`; `test` is read only by `train.py test` and eval.py (`setup("fit")` does not load it).

    Args:
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size per process.
        num_workers: loader worker processes (host mode only; 0 is right for resident data).
        on_device: keep each whole split on the model's device and gather batches there.
        crop_padding: zero padding of the random crop in pixels (0 disables the crop).
        flip: random horizontal flips in training.
        seed: seed of the shuffle order and the augmentation (linked to `seed_everything`).
        val_images: size of the validation split held out of the training split (0: train on all of
            it and validate on nothing; a ModelCheckpoint or EarlyStopping that monitors a `val/`
            metric then has nothing to monitor). Same `val_seed`, smaller size: a subset of the larger
            one when the sizes are multiples of the class count, so a restorer validating on 1,000
            images validates on images its victim (5,000 held out) never trained on.
        val_seed: seed of the validation draw; not linked to `seed_everything`, so runs with
            different training seeds hold out the same images.
    """

    class_names: tuple[str, ...] = ()
    channels: int = 3
    image_size: int = 32

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        on_device: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        val_images: int = 5000,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1 or crop_padding < 0 or val_images < 0:
            raise ValueError("batch sizes must be >= 1, crop_padding and val_images >= 0")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.on_device = on_device
        self.crop_padding = crop_padding
        self.flip = flip
        self.seed = seed
        self.val_images = val_images
        self.val_seed = val_seed
        self.val_indices: Tensor | None = None  # (val_images,) int64: where `val` lies in the training split
        self.splits: dict[str, ImageSplit] = {}
        self._resident: dict[tuple[str, torch.device], ImageSplit] = {}
        self._augmentation: tuple[int, torch.device, Tensor, Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_split(self, split: Split) -> ImageSplit:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and "train" not in self.splits:
            self._carve_validation(self.load_split("train"))
        if stage in (None, "test", "predict") and "test" not in self.splits:
            self.splits["test"] = self.load_split("test")

    def _carve_validation(self, full: ImageSplit) -> None:
        """Split the data set's training split into `train` and a class-balanced `val`."""
        kept, self.val_indices = hold_out(
            full.labels, self.val_images, self.val_seed, f"{type(self).__name__}'s training split"
        )
        self.splits["train"] = ImageSplit(full.images[kept], full.labels[kept])
        if self.val_images:
            self.splits["val"] = ImageSplit(full.images[self.val_indices], full.labels[self.val_indices])

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        dataset = _SplitDataset(split, self.splits[split], indices_only=self.on_device)
        options: dict[str, Any] = {
            "collate_fn": _keep_as_is,
            "num_workers": 0 if self.on_device else self.num_workers,
            "pin_memory": not self.on_device and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0 and not self.on_device,
        }
        if split == "train":
            return train_loader(self, dataset, batch_size, self.seed, **options)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_images == 0:
            return []  # Lightning then skips validation
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def on_after_batch_transfer(self, batch: SplitBatch, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = (batch.images, batch.labels) if batch.images is not None else self._gather(batch)
        if batch.split == "train":
            images = self._augment(images, batch.indices)
        return to_unit_float(images), labels

    def _gather(self, batch: SplitBatch) -> tuple[Tensor, Tensor]:
        device = batch.indices.device
        key = (batch.split, device)
        if key not in self._resident:
            split = self.splits[batch.split]
            self._resident[key] = ImageSplit(split.images.to(device), split.labels.to(device))
        resident = self._resident[key]
        return resident.images[batch.indices], resident.labels[batch.indices]

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _augment(self, images: Tensor, indices: Tensor) -> Tensor:
        if self.crop_padding == 0 and not self.flip:
            return images
        offsets, flips = self._epoch_augmentation(indices.device)
        return crop_and_flip(images, offsets[indices], flips[indices], self.crop_padding)

    def _epoch_augmentation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Crop offsets (N,2) and flips (N,) for every training image, drawn once per epoch."""
        epoch = self._epoch()
        if self._augmentation is None or self._augmentation[:2] != (epoch, device):
            n = len(self.splits["train"].labels)
            g = seeded_generator("cpu", self.seed, epoch)
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g, device=g.device)
            flips = (torch.rand(n, generator=g, device=g.device) < 0.5) & self.flip
            self._augmentation = (epoch, device, offsets.to(device), flips.to(device))
        return self._augmentation[2], self._augmentation[3]
