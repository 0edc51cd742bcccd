"""RAIN's structured randomization (SRd, Du et al. 2020): random downsampling plus a small random
circular shift, which breaks the spatial structure of an adversarial perturbation.

Each call draws one low-resolution side s in [min_size, max_size] for the whole batch (one
interpolation kernel per batch keeps it a single GPU call) and, per image, a shift (dy, dx) with
|dy|, |dx| <= max_shift. Draws come from the defense's generator (`reseed` fixes them), so two
calls differ and the same seed repeats them. The detail generator restores full size; on its
own (`StructuredRandomization`) the low-resolution image is resized back bicubically.
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


def randomize_structure(x: Tensor, generator: torch.Generator, min_size: int, max_size: int, max_shift: int, mode: str) -> Tensor:
    """SRd: x (N,C,H,W) in [0,1] -> (N,C,s,s) in [0,1], s drawn in [min_size, max_size], shifted per image."""
    side = int(torch.randint(min_size, max_size + 1, (1,), generator=generator, device=x.device))  # one host read per call
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=generator, device=x.device)
    low = F.interpolate(x, size=(side, side), mode=mode, antialias=mode in ("bilinear", "bicubic"), align_corners=False if mode != "nearest" else None)
    return circular_shift(low, shifts).clamp(0, 1)


class StructuredRandomization(Defense):
    """SRd alone as a defense: randomize, then resize back to the input size (bicubic).

    min_size, max_size: range of the random low-resolution side (e.g. 16..28 for 32 px images);
    max_shift: largest circular shift in low-resolution pixels; mode: the downsampling interpolation.
    """

    randomized = True

    def __init__(self, min_size: int = 16, max_size: int = 28, max_shift: int = 2, mode: str = "bilinear") -> None:
        super().__init__()
        if not 1 <= min_size <= max_size or max_shift < 0:
            raise ValueError(f"need 1 <= min_size <= max_size and max_shift >= 0, got {min_size}, {max_size}, {max_shift}")
        if mode not in ("nearest", "bilinear", "bicubic", "area"):
            raise ValueError(f"mode must be nearest, bilinear, bicubic or area, got {mode!r}")
        self.min_size, self.max_size, self.max_shift, self.mode = min_size, max_size, max_shift, mode

    def spec(self) -> dict[str, Any]:
        return {"name": "srd", "min_size": self.min_size, "max_size": self.max_size, "max_shift": self.max_shift, "mode": self.mode}

    def randomize(self, x: Tensor) -> Tensor:
        """The low-resolution randomized image (N,C,s,s); the detail generator's input."""
        return randomize_structure(x, self.generator(x.device), self.min_size, self.max_size, self.max_shift, self.mode)

    def forward(self, x: Tensor) -> Tensor:
        low = self.randomize(x)
        return F.interpolate(low, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
