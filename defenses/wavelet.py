"""Wavelet denoising: soft BayesShrink in YCbCr, batched on the GPU (Mustafa et al., TIP 2020).

The one wavelet denoiser of the project: the super-resolution restorer preprocesses its inputs
with it in training and at inference, and the evaluator runs it as a baseline. It follows
`skimage.restoration.denoise_wavelet(x, method="BayesShrink", mode="soft", convert2ycbcr=True,
channel_axis=-1)` (tests compare the two) but works on whole (N,C,H,W) batches with ptwt's
differentiable transforms instead of one image at a time on the CPU:

1. RGB -> YCbCr (ITU-R BT.601, as skimage);
2. per image and channel, a `levels`-level 2-D DWT (default: the largest level pywt allows for
   the size, minus 3, at least 1; "symmetric" borders);
3. noise sigma per image and channel: median(|finest diagonal details|, zeros left out) / 0.6745,
   unless `sigma` (in RGB units of [0,1] images) is given;
4. per sub-band, threshold sigma^2 / sqrt(max(var(details) - sigma^2, eps)) and soft shrinkage;
5. inverse DWT, back to RGB, clip to [0,1] (skimage leaves float output unclipped; a defense
   must return valid images).

skimage also rescales each YCbCr channel to [0,1] before thresholding; BayesShrink and soft
shrinkage commute with that scaling, so the result is the same without it.
"""

from __future__ import annotations

from typing import Any

import ptwt
import pywt
import torch
from torch import Tensor

from defenses.base import Defense

# ITU-R BT.601 for [0,1] RGB (skimage's matrix / 255); offsets (16, 128, 128) / 255.
_YCBCR_FROM_RGB = (
    torch.tensor([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=torch.float64)
    / 255
)
_YCBCR_OFFSET = torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64) / 255
_MAD_TO_SIGMA = 0.6744897501960817  # the 75th percentile of the standard normal


def _mix(x: Tensor, matrix: Tensor) -> Tensor:
    return torch.einsum("ij,njhw->nihw", matrix.to(x), x)


def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """x: (N,3,H,W) RGB in [0,1] -> YCbCr with Y in [16/255, 235/255]."""
    return _mix(x, _YCBCR_FROM_RGB) + _YCBCR_OFFSET.to(x).view(1, 3, 1, 1)


def ycbcr_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_ycbcr."""
    return _mix(x - _YCBCR_OFFSET.to(x).view(1, 3, 1, 1), torch.linalg.inv(_YCBCR_FROM_RGB))


def default_levels(height: int, width: int, wavelet: str) -> int:
    """skimage's default decomposition depth: the maximum for the size minus 3, at least 1."""
    return max(pywt.dwtn_max_level((height, width), wavelet) - 3, 1)


def _nonzero_median(values: Tensor) -> Tensor:
    """Median of |values| over the last dim ignoring exact zeros, as numpy's (mean of the middle pair).

    values: (..., M) -> (...); rows with no non-zero value give 0.
    """
    magnitudes = values.abs()
    count = (magnitudes > 0).sum(-1, keepdim=True)
    ordered = torch.where(magnitudes > 0, magnitudes, torch.full_like(magnitudes, float("inf"))).sort(-1).values
    lower = ordered.gather(-1, ((count - 1) // 2).clamp_min(0))
    upper = ordered.gather(-1, (count // 2).clamp_max(values.shape[-1] - 1))
    return torch.where(count > 0, (lower + upper) / 2, torch.zeros_like(lower)).squeeze(-1)


def _soft_bayes_shrink(details: Tensor, variance: Tensor) -> Tensor:
    """Soft-threshold one sub-band. details: (N,C,h,w); variance: (N,C) noise variance."""
    detail_variance = details.square().mean(dim=(-2, -1))
    eps = torch.finfo(details.dtype).eps
    threshold = (variance / (detail_variance - variance).clamp_min(eps).sqrt())[..., None, None]
    return details.sign() * (details.abs() - threshold).clamp_min(0)


def wavelet_denoise(
    x: Tensor, wavelet: str = "db1", levels: int | None = None, sigma: float | None = None, ycbcr: bool = True
) -> Tensor:
    """Soft BayesShrink wavelet denoising of a batch.

    x: (N,C,H,W) float in [0,1] (C=3 when ycbcr). sigma: known noise std in RGB units, or None to
    estimate it per image and channel. Returns (N,C,H,W) float in [0,1]; differentiable.
    """
    if ycbcr and x.shape[1] != 3:
        raise ValueError(f"YCbCr denoising needs 3 channels, got {x.shape[1]}; set ycbcr to false for other images")
    if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
        # ptwt takes fp32/fp64 only, and thresholds want full precision: leave autocast, come back in x's dtype.
        with torch.autocast(x.device.type, enabled=False):
            return wavelet_denoise(x.float(), wavelet, levels, sigma, ycbcr).to(x.dtype)
    height, width = x.shape[-2:]
    levels = default_levels(height, width, wavelet) if levels is None else levels
    work = rgb_to_ycbcr(x) if ycbcr else x
    coefficients = ptwt.wavedec2(work, wavelet, mode="symmetric", level=levels)
    if sigma is None:
        finest_diagonal = coefficients[-1][2]
        noise_sigma = _nonzero_median(finest_diagonal.flatten(2)) / _MAD_TO_SIGMA
    else:
        scale = _YCBCR_FROM_RGB.to(x).square().sum(1).sqrt() if ycbcr else torch.ones(x.shape[1]).to(x)
        noise_sigma = (sigma * scale).expand(x.shape[0], -1)
    variance = noise_sigma.square()
    shrunk = [coefficients[0]] + [
        type(level)(*(_soft_bayes_shrink(band, variance) for band in level)) for level in coefficients[1:]
    ]
    restored = ptwt.waverec2(shrunk, wavelet)[..., :height, :width]
    return (ycbcr_to_rgb(restored) if ycbcr else restored).clamp(0, 1)


class WaveletDenoise(Defense):
    """Soft BayesShrink wavelet denoising (see module docstring); differentiable."""

    def __init__(
        self, wavelet: str = "db1", levels: int | None = None, sigma: float | None = None, ycbcr: bool = True
    ) -> None:
        super().__init__()
        if wavelet not in pywt.wavelist(kind="discrete"):
            raise ValueError(f"unknown discrete wavelet {wavelet!r}; see pywt.wavelist(kind='discrete')")
        if levels is not None and levels < 1 or sigma is not None and sigma < 0:
            raise ValueError("levels must be >= 1 and sigma >= 0 when given")
        self.wavelet = wavelet
        self.levels = levels
        self.sigma = sigma
        self.ycbcr = ycbcr

    def spec(self) -> dict[str, Any]:
        return {
            "name": "wavelet",
            "wavelet": self.wavelet,
            "levels": self.levels,
            "sigma": self.sigma,
            "ycbcr": self.ycbcr,
        }

    def forward(self, x: Tensor) -> Tensor:
        return wavelet_denoise(x, self.wavelet, self.levels, self.sigma, self.ycbcr)
