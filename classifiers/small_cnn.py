"""A small VGG-style CNN: the victim of the quick start and the tests (73k parameters at the
default widths; learns the embedded shapes to 99.5% in 40 s on 2 CPU cores: docs/RESULTS.md)."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three stages of two conv-BN-ReLU layers, max-pooling between stages, global average
    pooling and a linear head. (N,C,H,W) -> (N,num_classes) logits."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for index, width in enumerate(widths):
            if index > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [_conv_bn_relu(channels, width), _conv_bn_relu(width, width)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N,C,H,W) -> last feature map (N,widths[-1],H/4,W/4)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
