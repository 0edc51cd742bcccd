"""ResNet-18 and PreAct-ResNet-18 for small images (CIFAR-style stem: one 3x3 convolution, no
max-pool), the usual victims of the robustness literature on CIFAR-10, SVHN and Fashion-MNIST.

Both take (N,C,H,W) normalized images (any H,W >= 8) and return (N,num_classes) logits.
`width` scales every stage (64 is the standard network; smaller widths are for CPU runs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (He et al. 2016a)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice plus shortcut, no activation after the sum (He et al. 2016b)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(pre)))) + shortcut


class ResNetCifar(nn.Module):
    """Four stages of two blocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average
    pooling and a linear head."""

    def __init__(self, block: type[nn.Module], num_classes: int, in_chans: int, width: int, preact: bool) -> None:
        super().__init__()
        self.stem = _conv3x3(in_chans, width)
        self.stem_norm = nn.Identity() if preact else nn.BatchNorm2d(width)
        stages, channels = [], width
        for index, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**index
            stages += [block(channels, out_channels, stride), block(out_channels, out_channels, 1)]
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        # Pre-activation networks end with the BN-ReLU their last block did not apply.
        self.final_norm = nn.BatchNorm2d(channels) if preact else nn.Identity()
        self.head = nn.Linear(channels, num_classes)
        self.preact = preact

    def features(self, x: Tensor) -> Tensor:
        """(N,C,H,W) -> last feature map (N,8w,H/8,W/8), after the final activation."""
        out = self.stem_norm(self.stem(x))
        out = self.stages(out if self.preact else F.relu(out))
        return F.relu(self.final_norm(out))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def resnet18_cifar(num_classes: int = 10, in_chans: int = 3, width: int = 64) -> ResNetCifar:
    """ResNet-18, CIFAR variant: 11.2M parameters at width 64 and 10 classes."""
    return ResNetCifar(BasicBlock, num_classes, in_chans, width, preact=False)


def preact_resnet18(num_classes: int = 10, in_chans: int = 3, width: int = 64) -> ResNetCifar:
    """PreAct-ResNet-18, the standard network of CIFAR-10 adversarial-training baselines."""
    return ResNetCifar(PreActBlock, num_classes, in_chans, width, preact=True)
