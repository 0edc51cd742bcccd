"""Building blocks shared by the restorers' networks (EDSR, RAIN's detail generator, TRN)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class MeanShift(nn.Module):
    """Adds sign * mean per channel: EDSR subtracts the data mean at the head and adds it back at the tail."""

    def __init__(self, mean: Sequence[float], sign: int) -> None:
        super().__init__()
        self.register_buffer(
            "shift", sign * torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift.to(x.dtype)


class ResidualBlock(nn.Module):
    """conv-ReLU-conv with the residual scaled by `res_scale` (no batch norm: Lim et al. 2017)."""

    def __init__(self, channels: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels), nn.ReLU(inplace=True), conv3x3(channels, channels))
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) * self.res_scale


class PixelShuffleUpsampler(nn.Sequential):
    """Upsample features by `scale` in {1, 2, 3, 4, 8, ...}: conv to scale^2 channels + pixel shuffle
    (powers of two as repeated x2 stages, as in EDSR); scale 1 is the identity."""

    def __init__(self, channels: int, scale: int) -> None:
        if scale == 1:
            stages = []
        elif scale == 3:
            stages = [(3, 1)]
        elif scale >= 2 and scale & (scale - 1) == 0:
            stages = [(2, int(math.log2(scale)))]
        else:
            raise ValueError(f"upsampling scale must be 1, 3 or a power of two, got {scale}")
        layers: list[nn.Module] = []
        for factor, repeats in stages:
            for _ in range(repeats):
                layers += [conv3x3(channels, channels * factor**2), nn.PixelShuffle(factor)]
        super().__init__(*layers)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (Hu et al. 2018; RCAN's CA): features rescaled
    per channel by a gate computed from their global average."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)
