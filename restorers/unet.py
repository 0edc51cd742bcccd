"""The residual U-net the robust restorer and the denoiser share: (N,C,H,W) in [0,1] -> same.

    conv3x3(x - 0.5) -> [residual blocks -> stride-2 conv] per level -> residual blocks at the
    coarsest level -> [pixel-shuffle x2 -> + skip -> residual blocks] per level -> conv3x3 to C
    output: clamp(x + correction, 0, 1)

Why a U: at 32 px the coarsest of three levels sees the whole object after a few convolutions,
and the coarse levels cost a quarter and a sixteenth of the full-resolution FLOPs per channel, so
width goes where it is cheap; a flat EDSR body of the same cost sees ~17 px. Each user says in its
own docstring why it needs that context.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from restorers.blocks import ResidualBlock, conv3x3


class ResidualUNet(nn.Module):
    """(N,C,H,W) in [0,1] -> (N,C,H,W) in [0,1], H and W divisible by 2^(len(widths) - 1).

    widths: channels per level, finest first (each level halves the resolution of the one before);
    blocks: residual blocks per level on each side (and at the coarsest level);
    identity_start: start the last convolution at zero, so the untrained network is the identity;
    residual: add the correction to the input (else to mid-grey: the input's perturbation then has
        no path to the output but through the convolutions).
    """

    def __init__(
        self,
        in_chans: int = 3,
        widths: tuple[int, ...] = (64, 128, 256),
        blocks: int = 2,
        identity_start: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or blocks < 1:
            raise ValueError(f"need at least one level and one block per level, got widths={widths}, blocks={blocks}")
        if identity_start and not residual:
            raise ValueError("identity_start needs residual: true (it zeroes the correction added to the input)")
        self.head = conv3x3(in_chans, widths[0])
        self.encoder = nn.ModuleList(_blocks(width, blocks) for width in widths[:-1])
        self.down = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.middle = _blocks(widths[-1], blocks)
        self.up = nn.ModuleList(
            nn.Sequential(conv3x3(b, a * 4), nn.PixelShuffle(2)) for a, b in zip(widths, widths[1:])
        )
        self.decoder = nn.ModuleList(_blocks(width, blocks) for width in widths[:-1])
        self.tail = conv3x3(widths[0], in_chans)
        self.factor = 2 ** (len(widths) - 1)
        self.residual = residual
        if identity_start:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(
                f"ResidualUNet with {len(self.down) + 1} levels needs H and W divisible by {self.factor}, "
                f"got {tuple(x.shape[-2:])}: use fewer widths or pad the images"
            )
        features = self.head(x - 0.5)
        skips = []
        for encode, down in zip(self.encoder, self.down):
            features = encode(features)
            skips.append(features)
            features = down(features)
        features = self.middle(features)
        for up, decode, skip in zip(reversed(self.up), reversed(self.decoder), reversed(skips)):
            features = decode(up(features) + skip)
        return ((x if self.residual else 0.5) + self.tail(features)).clamp(0, 1)


def _blocks(width: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(width) for _ in range(count)))


def unet_settings(in_chans: int, arch: dict[str, Any] | None) -> dict[str, Any]:
    """A restorer's network settings for its export: plain values only (weights_only loading)."""
    arch = dict(arch or {})
    if "widths" in arch:
        arch["widths"] = list(arch["widths"])
    return {"in_chans": in_chans, "arch": arch}


def build_unet(in_chans: int, arch: dict[str, Any]) -> ResidualUNet:
    """The network of unet_settings(in_chans, arch)."""
    return ResidualUNet(in_chans, **arch)
