"""The defense interface every purifier of the project implements, and the defended model.

A defense maps images to images: x (N,C,H,W) float in [0,1] -> (N,C,H,W) float in [0,1], the
same size. It declares what an honest evaluation must know about it:

- `differentiable`: autograd through `forward` gives the true gradient (a white-box attack
  may use it). JPEG or bit-depth reduction are not: their gradient is zero or absent.
- `randomized`: two calls on the same input may differ; attacks then need EOT.
- `needs_classifier`: the defense calls the classifier itself (a gradient map, a CAM); the
  factory hands it the frozen classifier.
- `surrogate(x)`: a differentiable stand-in used by BPDA (Athalye et al. 2018) on the backward
  pass; the identity unless a defense knows better.

BPDA belongs to the model, not to the attack: `bpda(x)` returns the defense's real output on
the forward pass with the surrogate's gradient on the backward pass, so any gradient attack
becomes a BPDA attack by attacking `DefendedClassifier(..., backward="bpda")`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from engine.seeding import seeded_generator

Backward = Literal["exact", "bpda"]


class Defense(nn.Module):
    """Base class. Subclasses implement `forward` and set the three flags as class attributes."""

    differentiable: bool = True
    randomized: bool = False
    needs_classifier: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._seed_keys: tuple[int, ...] = (0,)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._label: str | None = None

    @property
    def label(self) -> str:
        """How results name this defense: its spec as one token, unless the run that loaded it gave it a
        longer name (two exports of one kind and the same settings differ only in their weights)."""
        return self._label or describe(self.spec())

    @label.setter
    def label(self, text: str) -> None:
        self._label = text

    def spec(self) -> dict[str, Any]:
        """What rebuilds this defense by name: {"name": ..., **constructor arguments}."""
        raise NotImplementedError

    def surrogate(self, x: Tensor) -> Tensor:
        """Differentiable approximation of `forward` for BPDA; x: (N,C,H,W) in [0,1]."""
        return x

    def bpda(self, x: Tensor) -> Tensor:
        """forward(x) on the forward pass, the surrogate's gradient on the backward pass."""
        stand_in = self.surrogate(x)
        return stand_in + (self(x) - stand_in).detach()

    def reseed(self, *keys: int) -> None:
        """Fix the random draws of a randomized defense to a function of integer keys."""
        self._seed_keys = tuple(keys)
        self._generators = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The defense's generator on `device`; successive calls continue one stream (fresh draws)."""
        if device not in self._generators:
            self._generators[device] = seeded_generator(device, *self._seed_keys)
        return self._generators[device]

    def scored_model(self, classifier: nn.Module) -> nn.Module:
        """What eval.py scores behind this defense (the argmax of its logits): classifier(defense(x)),
        unless the defense predicts otherwise (randomized smoothing's vote with abstention)."""
        return DefendedClassifier(classifier, self)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.spec().items() if key != "name")


def describe(spec: dict[str, Any]) -> str:
    """A defense spec as one readable token, e.g. 'jpeg(quality=75)' (arguments left at None omitted)."""
    arguments = ",".join(f"{key}={value}" for key, value in spec.items() if key != "name" and value is not None)
    return f"{spec['name']}({arguments})" if arguments else spec["name"]


class DefendedClassifier(nn.Module):
    """classifier(defense(x)): x (N,C,H,W) float in [0,1] -> logits (N,K).

    backward="exact" differentiates through the defense as it is (white-box); "bpda" uses the
    defense's surrogate on the backward pass (the forward pass is the real defense either way).
    """

    def __init__(self, classifier: nn.Module, defense: Defense, backward: Backward = "exact") -> None:
        super().__init__()
        if backward not in ("exact", "bpda"):
            raise ValueError(f"backward must be 'exact' or 'bpda', got {backward!r}")
        self.classifier = classifier
        self.defense = defense
        self.backward = backward

    def forward(self, x: Tensor) -> Tensor:
        restored = self.defense.bpda(x) if self.backward == "bpda" else self.defense(x)
        return self.classifier(restored)
