"""Input-transformation baselines, batched on the input's device.

These are the defenses whose gray-box numbers once looked strong and which fell to BPDA and EOT
(Guo et al. 2018; Xu et al. 2018; Xie et al. 2018; Athalye et al. 2018). Every learned restorer
is measured against them under the same attacks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg

from defenses.base import Defense


def to_uint8(x: Tensor) -> Tensor:
    """x: float in [0,1] -> uint8 in [0,255], rounded to nearest."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class Identity(Defense):
    """No defense: the classifier sees the input as it is."""

    def spec(self) -> dict[str, Any]:
        return {"name": "identity"}

    def forward(self, x: Tensor) -> Tensor:
        return x


class Jpeg(Defense):
    """JPEG compression at `quality` (1-100) with libjpeg on the CPU, whatever device x is on.

    Not nvJPEG on CUDA inputs: on an H200 its round trip at quality 75 differed from libjpeg's by
    6.4/255 per pixel on average (docs/RESULTS.md, issue 13), so the defense, and every number
    measured through it, would depend on the device it ran on.
    """

    differentiable = False

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = quality

    def spec(self) -> dict[str, Any]:
        return {"name": "jpeg", "quality": self.quality}

    def forward(self, x: Tensor) -> Tensor:
        encoded = encode_jpeg(list(to_uint8(x).cpu()), quality=self.quality)
        # /255 on the CPU too: CUDA divides by a scalar through its reciprocal, an ulp away at times
        return (torch.stack(decode_jpeg(encoded)).to(x.dtype) / 255).to(x.device)


class BitDepth(Defense):
    """Colour bit-depth reduction to `bits` per channel (feature squeezing, Xu et al. 2018)."""

    differentiable = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        self.bits = bits

    def spec(self) -> dict[str, Any]:
        return {"name": "bit_depth", "bits": self.bits}

    def forward(self, x: Tensor) -> Tensor:
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels


class MedianFilter(Defense):
    """Median of each `kernel` x `kernel` window (reflect padding); differentiable almost everywhere."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd size >= 1, got {kernel}")
        self.kernel = kernel

    def spec(self) -> dict[str, Any]:
        return {"name": "median", "kernel": self.kernel}

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        pad = self.kernel // 2
        windows = F.unfold(F.pad(x, (pad,) * 4, mode="reflect"), self.kernel)  # (N, C*k*k, H*W)
        return windows.view(n, c, self.kernel**2, h * w).median(dim=2).values.view(n, c, h, w)


class BicubicDownUp(Defense):
    """Bicubic (antialiased) downsampling by `factor`, then bicubic upsampling to the input size."""

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        if factor <= 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        self.factor = factor

    def spec(self) -> dict[str, Any]:
        return {"name": "bicubic", "factor": self.factor}

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        small = [max(1, round(side / self.factor)) for side in size]
        low = F.interpolate(x, size=small, mode="bicubic", antialias=True, align_corners=False)
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


class RandomResizePad(Defense):
    """Random resizing and padding (Xie et al. 2018), brought back to the input size.

    Each call draws one side s in [H, H + max_pad] for the batch and, per image, where the
    resized image sits inside a zero canvas of side H + max_pad; the canvas is resized back to
    H x W bilinearly so that the output has the input's size.
    """

    randomized = True

    def __init__(self, max_pad: int = 4) -> None:
        super().__init__()
        if max_pad < 1:
            raise ValueError(f"max_pad must be >= 1, got {max_pad}")
        self.max_pad = max_pad

    def spec(self) -> dict[str, Any]:
        return {"name": "random_resize_pad", "max_pad": self.max_pad}

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.generator(x.device)
        grow = int(torch.randint(0, self.max_pad + 1, (1,), generator=g, device=x.device))  # one host read per call
        resized = F.interpolate(x, size=(h + grow, w + grow), mode="bilinear", align_corners=False)
        room = self.max_pad - grow
        top = torch.randint(0, room + 1, (n, 1, 1), generator=g, device=x.device)
        left = torch.randint(0, room + 1, (n, 1, 1), generator=g, device=x.device)
        rows = torch.arange(h + grow, device=x.device).view(1, -1, 1) + top
        cols = torch.arange(w + grow, device=x.device).view(1, 1, -1) + left
        canvas = x.new_zeros(n, h + self.max_pad, w + self.max_pad, c)
        canvas[torch.arange(n, device=x.device).view(-1, 1, 1), rows, cols] = resized.permute(0, 2, 3, 1)
        return F.interpolate(canvas.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
