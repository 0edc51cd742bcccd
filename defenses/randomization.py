"""RAIN's structured randomization (SRd, Du et al. 2020): a small random circular shift and a
random downsampling, which break the spatial structure of an adversarial perturbation.

Each call draws one low-resolution side s in [min_size, max_size] for the whole batch (one
interpolation kernel per batch keeps it a single GPU call) and, per image, a shift (dy, dx) with
|dy|, |dx| <= max_shift input pixels. The shift comes first, at full resolution (ours: the order
is not fixed by the paper): a shift of whole input pixels is a sub-pixel shift of the
low-resolution image, and training can shift the clean target by exactly the same amount, so
the detail generator learns to restore detail, never to guess the shift. Draws come from the
defense's generator (`reseed` fixes them), so two calls differ and the same seed repeats them.
On its own (`StructuredRandomization`) the low-resolution image is resized back bicubically.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from defenses.base import Defense


def circular_shift(x: Tensor, shifts: Tensor) -> Tensor:
    """Roll each image by its own (dy, dx). x: (N,C,H,W); shifts: (N,2) int64 -> (N,C,H,W)."""
    n, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device).view(1, h) - shifts[:, :1]) % h  # (N,H)
    cols = (torch.arange(w, device=x.device).view(1, w) - shifts[:, 1:]) % w  # (N,W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def draw_structure(
    count: int, generator: torch.Generator, min_size: int, max_size: int, max_shift: int
) -> tuple[int, Tensor]:
    """One SRd draw: the low-resolution side s (a Python int) and (count,2) int64 shifts on the generator's device."""
    side = int(
        torch.randint(min_size, max_size + 1, (1,), generator=generator, device=generator.device)
    )  # one host read per call
    shifts = torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator, device=generator.device)
    return side, shifts


def randomize_structure(x: Tensor, side: int, shifts: Tensor, mode: str) -> Tensor:
    """SRd with a given draw: x (N,C,H,W) in [0,1] -> shifted, downsampled (N,C,side,side) in [0,1]."""
    antialias = mode in ("bilinear", "bicubic")
    low = F.interpolate(
        circular_shift(x, shifts),
        size=(side, side),
        mode=mode,
        antialias=antialias,
        align_corners=False if mode != "nearest" else None,
    )
    return low.clamp(0, 1)


def upsample(low: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize of SRd's (N,C,s,s) output back to the input size (N,C,H,W), clamped to [0,1]."""
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


class StructuredRandomization(Defense):
    """SRd alone as a defense: randomize, then resize back to the input size (bicubic).

    min_size, max_size: range of the random low-resolution side (e.g. 16..28 for 32 px images);
    max_shift: largest circular shift in input pixels; mode: the downsampling interpolation.
    """

    randomized = True

    def __init__(self, min_size: int = 16, max_size: int = 28, max_shift: int = 2, mode: str = "bilinear") -> None:
        super().__init__()
        if not 1 <= min_size <= max_size or max_shift < 0:
            raise ValueError(
                f"need 1 <= min_size <= max_size and max_shift >= 0, got {min_size}, {max_size}, {max_shift}"
            )
        if mode not in ("nearest", "bilinear", "bicubic", "area"):
            raise ValueError(f"mode must be nearest, bilinear, bicubic or area, got {mode!r}")
        self.min_size = min_size
        self.max_size = max_size
        self.max_shift = max_shift
        self.mode = mode

    def spec(self) -> dict[str, Any]:
        return {
            "name": "srd",
            "min_size": self.min_size,
            "max_size": self.max_size,
            "max_shift": self.max_shift,
            "mode": self.mode,
        }

    def draw(self, count: int, generator: torch.Generator) -> tuple[int, Tensor]:
        """A draw (side, (count,2) shifts) from `generator`, on its device."""
        return draw_structure(count, generator, self.min_size, self.max_size, self.max_shift)

    def apply(self, x: Tensor, side: int, shifts: Tensor) -> Tensor:
        """SRd with a given draw, resized back: x (N,C,H,W) in [0,1] -> (N,C,H,W) in [0,1]."""
        return upsample(randomize_structure(x, side, shifts, self.mode), x.shape[-2:])

    def randomize(self, x: Tensor) -> Tensor:
        """The low-resolution randomized image (N,C,s,s) in [0,1], a fresh draw of the defense's generator."""
        return randomize_structure(x, *self.draw(len(x), self.generator(x.device)), self.mode)

    def forward(self, x: Tensor) -> Tensor:
        return self.apply(x, *self.draw(len(x), self.generator(x.device)))
