"""Class-balanced index subsets of a split: the validation split the data modules hold out of
the training split and the evaluation subset of eval.py are drawn the same way (image-folder
splits are sorted by class, so "the first n images" of CIFAR-10 are all airplanes)."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.seeding import seeded_generator


def balanced_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """n indices into `labels` ((N,) int64), as equal per class as possible (the remainder going to
    classes chosen from `seed`), each class's drawn from `seed`; sorted ascending."""
    classes = labels.unique()
    if n < 1 or n > len(labels):
        raise ValueError(f"n must be in 1..{len(labels)} (the split's size), got {n}")
    generator = seeded_generator("cpu", seed)
    quota = torch.full((len(classes),), n // len(classes), device="cpu")
    quota[torch.randperm(len(classes), generator=generator, device="cpu")[: n % len(classes)]] += 1
    chosen = []
    for label, count in zip(classes.tolist(), quota.tolist()):
        members = (labels == label).nonzero().flatten()
        if count > len(members):
            raise ValueError(f"class {label} has {len(members)} images, fewer than the {count} a balanced n={n} needs")
        chosen.append(
            members[torch.randperm(len(members), generator=generator, device="cpu").to(members.device)[:count]]
        )
    return torch.cat(chosen).sort().values


def hold_out(labels: Tensor, n: int, seed: int, source: str) -> tuple[Tensor, Tensor]:
    """(kept, held_out): sorted int64 indices into `labels` ((N,) int64) that partition it, held_out
    being `balanced_indices(labels, n, seed)` (n = 0 holds out nothing). `source` names the split
    in the error when n cannot be held out."""
    if n == 0:
        return torch.arange(len(labels), device="cpu"), torch.zeros(0, dtype=torch.int64, device="cpu")
    try:
        held_out = balanced_indices(labels, n, seed)
    except ValueError as error:
        raise ValueError(
            f"val_images={n} cannot be held out of {source} ({error}). Set `data.init_args.val_images` "
            "lower, or 0 to train on the whole split without validation."
        ) from error
    kept = torch.ones(len(labels), dtype=torch.bool, device="cpu")
    kept[held_out] = False
    return kept.nonzero().flatten(), held_out


def classes_in_turn(labels: Tensor, count: int) -> Tensor:
    """Positions of `count` entries of `labels` ((n,) int64), taking the classes in turn: the first of
    each class, then the second of each, and so on. Any prefix of the result is as class-balanced as
    the labels allow, where `[:count]` of a class-sorted list is one or two classes.
    Returns (min(count, n),) int64 positions, on labels' device."""
    rank = torch.zeros_like(labels)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        rank[members] = torch.arange(len(members), device=labels.device)
    classes = int(labels.max().item()) + 1 if len(labels) else 1
    return torch.argsort(rank * classes + labels, stable=True)[:count]
