"""CIIDefence's learned inpainter, trained with the frozen classifier in its loss.

    python train.py fit --config configs/cii_cifar10.yaml

CIIDefence (defenses/cii.py) removes small boxes around the classifier's strongest CAM peaks and
inpaints them. The paper used a generative inpainting network trained on the data set; ours is a
small encoder-decoder (InpaintingNetwork) trained here, with OpenCV's Telea as the training-free
fallback and as the baseline every validation measures it against.

Training step, top-down: clean batch -> an `adversarial_share` of it attacked on the fly against
the frozen classifier -> one box mask per image, placed where CIIDefence would place it ("cam":
the boxes of one of the top classes, the rank cycling with the step) or uniformly at random
("random"), seeded by (step, rank) -> InpaintingNetwork(masked image, mask) -> L1 to the clean
image inside the boxes (outside them the output is the input) + the classifier's loss on the
result -> logs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.cam import box_mask
from defenses.cii import CIIDefence, Fusion, Inpainter, TeleaInpainter
from engine.seeding import seeded_generator
from restorers.base import RestorerModule
from restorers.blocks import ResidualBlock, conv3x3
from restorers.registry import register_restorer

Placement = Literal["cam", "random"]
_MASK_STREAM = 3  # keeps the random box draws apart from the training attack's, which share (step, rank)


class DilatedBlock(ResidualBlock):
    """A residual block whose convolutions are dilated: 32 px boxes need context from far away."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__(channels)
        for index in (0, 2):
            self.body[index] = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)


def smooth_fill(x: Tensor, mask: Tensor, passes: int = 2, sigma: float = 2.0) -> Tensor:
    """Holes filled by normalised convolution: a Gaussian-weighted mean of the known pixels around
    each hole pixel, `passes` times outward (each pass reaches about 2 sigma further in).

    x: (N,C,H,W) in [0,1]; mask: (N,1,H,W) in {0,1}, 1 in the holes -> (N,C,H,W) in [0,1], x where mask is 0.
    """
    radius = int(2 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel_1d = torch.exp(-offsets.square() / (2 * sigma**2))
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(1, 1, -1, -1)
    known, filled = 1 - mask, x * (1 - mask)
    for _ in range(passes):
        weight = F.conv2d(known, kernel, padding=radius)
        total = F.conv2d(filled.flatten(0, 1).unsqueeze(1), kernel, padding=radius).view_as(x)
        estimate = total / weight.clamp_min(1e-6)
        filled = torch.where(known > 0, filled, estimate * (weight > 1e-6))
        known = torch.maximum(known, (weight > 1e-6).to(x.dtype))
    return filled.clamp(0, 1)


class InpaintingNetwork(Inpainter):
    """(x (N,C,H,W) in [0,1], mask (N,1,H,W) in {0,1}) -> x outside the mask, the prediction inside.

    The holes are first filled smoothly (`smooth_fill`); the network sees that image and the mask
    and adds a correction: conv -> stride-2 conv -> dilated residual blocks (dilations 1, 2, 4,
    ...) at half resolution -> upsample, concatenate the full-resolution features -> conv. The last
    conv starts at zero, so an untrained network is the smooth fill.
    """

    def __init__(self, in_chans: int = 3, num_features: int = 32, num_blocks: int = 4) -> None:
        super().__init__()
        self.head = nn.Sequential(conv3x3(in_chans + 1, num_features), nn.ReLU(inplace=True))
        self.down = nn.Sequential(
            nn.Conv2d(num_features, 2 * num_features, 3, stride=2, padding=1), nn.ReLU(inplace=True)
        )
        self.body = nn.Sequential(*(DilatedBlock(2 * num_features, 2 ** (index % 3)) for index in range(num_blocks)))
        self.tail = nn.Sequential(
            conv3x3(3 * num_features, num_features), nn.ReLU(inplace=True), conv3x3(num_features, in_chans)
        )
        nn.init.zeros_(self.tail[-1].weight)
        nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        mask = mask.to(x.dtype)
        filled = smooth_fill(x, mask)
        features = self.head(torch.cat([filled - 0.5, mask], dim=1))
        coarse = F.interpolate(self.body(self.down(features)), size=x.shape[-2:], mode="nearest")
        predicted = (filled + self.tail(torch.cat([features, coarse], dim=1))).clamp(0, 1)
        return x * (1 - mask) + mask * predicted


@register_restorer
class InpainterRestorer(RestorerModule):
    """The inpainter trained for CIIDefence. Args (besides RestorerModule's):

    arch: InpaintingNetwork's num_features and num_blocks.
    placement: "cam" (boxes where CIIDefence puts them) or "random" (boxes anywhere).
    top_classes, maxima, half_width, nms_radius, fusion, blend, wavelet, sigma, cam_layer:
        CIIDefence's settings (defenses/cii.py), used in training (boxes) and exported with the weights.
    """

    kind = "cii"

    def __init__(
        self,
        classifier: str,
        arch: dict[str, int] | None = None,
        placement: Placement = "cam",
        top_classes: int = 2,
        maxima: int = 3,
        half_width: int = 3,
        nms_radius: int | None = None,
        fusion: Fusion = "paste",
        blend: float = 0.5,
        wavelet: str = "db1",
        sigma: float | None = None,
        cam_layer: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(classifier, **kwargs)
        if placement not in ("cam", "random"):
            raise ValueError(f"placement must be 'cam' or 'random', got {placement!r}")
        self.defense()  # validates the CIIDefence settings now, not at the first validation
        self.telea = TeleaInpainter()

    def training_masks(self, x: Tensor, step: int) -> Tensor:
        """One box mask (N,1,H,W) per image for `step` (see module docstring)."""
        hp = self.hparams
        if hp.placement == "cam":
            return self.defense().masks(x)[:, abs(step) % hp.top_classes]
        generator = seeded_generator(x.device, step, self.global_rank, _MASK_STREAM)
        height, width = x.shape[-2:]
        uniform = torch.rand(len(x), hp.maxima, 2, generator=generator, device=x.device)
        peaks = (uniform * torch.tensor([height, width], device=x.device)).long()
        return box_mask(peaks, hp.half_width, (height, width))

    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial_part(x, y, step, evaluation)
        source = torch.cat([x_adv, x[len(x_adv) :]])
        return torch.cat([source, self.training_masks(source, step).to(source.dtype)], dim=1), x

    def restore(self, inputs: Tensor) -> Tensor:
        return self.restorer(inputs[:, :-1], inputs[:, -1:])

    def restoration_loss(self, restored: Tensor, target: Tensor, inputs: Tensor) -> Tensor:
        """L1 over the holes only: outside them the output is the input, and averaging over the whole
        image would shrink the gradients to where Adam's epsilon swamps them."""
        holes = inputs[:, -1:].float()
        error = (restored.float() - target.float()).abs() * holes
        return error.sum() / (holes.sum() * restored.shape[1]).clamp_min(1)

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        return self.telea(inputs[:, :-1], inputs[:, -1:])  # the training-free fallback the network must beat

    # --- the network and the defense, from the two settings dicts the export keeps -------------
    def network_settings(self) -> dict[str, Any]:
        return {"in_chans": self.hparams.in_chans, "arch": dict(self.hparams.arch or {})}

    @staticmethod
    def build_network(in_chans: int, arch: dict[str, int]) -> nn.Module:
        return InpaintingNetwork(in_chans, **arch)

    def defense_settings(self) -> dict[str, Any]:
        """CIIDefence's settings; the boxes of training come from the same ones."""
        keys = ("top_classes", "maxima", "half_width", "nms_radius", "fusion", "blend", "wavelet", "sigma", "cam_layer")
        return {key: self.hparams[key] for key in keys}

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> CIIDefence:
        """CIIDefence around the inpainter and the classifier whose CAMs place the boxes (shared, not
        copied; built per call, so that neither is registered twice in the module's state dict)."""
        if classifier is None:
            raise ValueError(
                "CIIDefence places its boxes with the classifier's CAMs: pass the classifier (eval.py's --classifier)"
            )
        return CIIDefence(classifier, network, **settings)

    @staticmethod
    def settings_from_v1(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"in_chans": model["in_chans"], "arch": model["arch"]}, dict(model["cii"])
