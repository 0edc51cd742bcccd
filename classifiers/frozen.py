"""Classifiers that take [0,1] images: normalization inside, and a frozen variant for loss loops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


class NormalizedClassifier(nn.Module):
    """x: (N,C,H,W) float in [0,1] -> logits (N,K) = net((x - mean) / std).

    mean/std are per-channel; None means 0.5 for every channel (inputs mapped to [-1,1]).
    They are non-persistent buffers: they follow the module's device but are not in its
    state_dict (the export file records them beside the weights).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.net = net
        channels = len(mean) if mean is not None else len(std) if std is not None else 1
        mean = [0.5] * channels if mean is None else list(mean)
        std = [0.5] * channels if std is None else list(std)
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean} std={std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


class FrozenClassifier(NormalizedClassifier):
    """A NormalizedClassifier that never trains: every parameter has requires_grad=False (so no
    optimizer updates it and DDP does not try to reduce it), and it stays in eval mode even when
    a parent module or an attack library calls `.train()` (BatchNorm keeps its running
    statistics). Gradients with respect to the input still flow.

    spec: what rebuilt it (classifiers.victim.CLASSIFIER_SPEC_KEYS: arch, num_classes, in_chans,
    ...) when it came from a file, so that its users can check it against their data without
    running it, on whatever device it sits.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(net, mean, std)
        self.spec = dict(spec) if spec is not None else None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenClassifier:
        return super().train(False)


def spec_misfit(classifier: FrozenClassifier, channels: int, num_classes: int) -> str | None:
    """Why `classifier`, by what its file says it was built for, cannot score a data set's images of
    `channels` channels and `num_classes` classes, or None (also where it came from no file). Nothing
    runs: it holds wherever the classifier sits, before any device or image size is known. The channels
    are checked here because the classifier's normalization would broadcast one grey channel to three
    without a word."""
    spec = classifier.spec or {}
    if spec.get("in_chans", channels) != channels:
        return f"it was built for {spec['in_chans']} channels, the images have {channels}"
    if spec.get("num_classes", num_classes) != num_classes:
        return f"it was built for {spec['num_classes']} classes, the data has {num_classes}"
    return None


def misfit(classifier: FrozenClassifier, shape: tuple[int, int, int], num_classes: int) -> str | None:
    """Why `classifier` cannot score a data set's images of `shape` (C,H,W) with `num_classes` classes,
    or None when it can: spec_misfit, then the size and the classes by one forward pass of a blank
    image on the classifier's own device (a classifier from no file has only the latter)."""
    problem = spec_misfit(classifier, shape[0], num_classes)
    if problem is not None:
        return problem
    device = next(classifier.parameters()).device
    try:
        with torch.no_grad():
            predicted = classifier(torch.zeros(1, *shape, device=device)).shape[1]
    except (RuntimeError, AssertionError) as mismatch:  # timm checks input sizes with assertions
        return f"it fails on {shape} (channels, height, width) images: {str(mismatch).splitlines()[0]}"
    if predicted != num_classes:
        return f"it predicts {predicted} classes, the data has {num_classes}"
    return None
