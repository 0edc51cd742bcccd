"""Restorer 2: RAIN (Du et al., 2020), structured randomization followed by a detail generator.

    python train.py fit --config configs/rain_cifar10.yaml

The defense at inference (RainDefense), randomized and differentiable:
    x (N,C,H,W) in [0,1] -> SRd: shift each image by a few pixels, downsample the batch to a
    random side s (defenses/randomization.py) -> bicubic back to (H,W) -> DG -> clamp [0,1]

The detail generator (DG) handles SRd's random scale by working after the resize: it is an
EDSR body at x1 (no upsampler) whose output is added to the bicubic upsampling of SRd's output
(`bicubic_skip`, restorers/edsr.py). One network then serves every s in [min_size, max_size]
without discarding pixels (the alternative, resizing to a fixed low resolution and upsampling
xN, throws away what SRd kept whenever s exceeds H/N), and it starts as plain SRd + bicubic and
learns only the lost detail. The price is that it runs at full resolution.

Training pairs: (bicubic(SRd(x')), shift(x)), where x' is the clean image or, for an
`adversarial_share` of the batch, a PGD adversarial made on the fly against the frozen
classifier, and shift(x) is the clean image moved by SRd's own shift: DG restores detail and
never has to guess the random shift. The SRd draws are seeded by (step, rank), so resumed and
DDP runs repeat them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from defenses.randomization import StructuredRandomization, circular_shift
from engine.seeding import seeded_generator
from restorers.base import RestorerModule
from restorers.edsr import EDSR, build_edsr
from restorers.registry import register_restorer

_SRD_STREAM = 1  # keeps the training SRd draws apart from the training attack's, which share (step, rank)


def build_detail_generator(preset: str, in_chans: int, arch_kwargs: dict[str, Any] | None = None) -> EDSR:
    """DG: an EDSR preset at x1 with the bicubic (here: identity) skip, unless arch_kwargs say otherwise.
    (N,C,H,W) bicubic-upsampled SRd output -> (N,C,H,W), unclamped."""
    return build_edsr(preset, 1, in_chans, **{"bicubic_skip": True, **(arch_kwargs or {})})


class RainDefense(StructuredRandomization):
    """SRd -> bicubic to the input size -> DG; wraps a trained DG (weights shared, not copied)."""

    def __init__(self, network: nn.Module, min_size: int, max_size: int, max_shift: int, mode: str) -> None:
        super().__init__(min_size, max_size, max_shift, mode)
        self.network = network

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "name": "rain"}

    def forward(self, x: Tensor) -> Tensor:
        return self.network(super().forward(x)).clamp(0, 1)


@register_restorer
class RainRestorer(RestorerModule):
    """RAIN's detail generator trained as a defense. Args (besides RestorerModule's):

    preset, arch_kwargs: the DG's EDSR preset ("baseline", "large") and its overrides
        (num_blocks, num_features, res_scale, mean, bicubic_skip).
    min_size, max_size, max_shift, mode: SRd's range of the low-resolution side (pixels),
        largest shift (input pixels) and downsampling interpolation, at training and inference.
    """

    kind = "rain"

    def __init__(
        self,
        classifier: str,
        preset: str = "baseline",
        arch_kwargs: dict[str, Any] | None = None,
        min_size: int = 16,
        max_size: int = 28,
        max_shift: int = 2,
        mode: str = "bilinear",
        **kwargs: Any,
    ) -> None:
        super().__init__(classifier, **kwargs)
        self.srd = StructuredRandomization(**self.defense_settings())  # validates the ranges

    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial_part(x, y, step, evaluation)
        source = torch.cat([x_adv, x[len(x_adv) :]])
        side, shifts = self.srd.draw(len(x), seeded_generator(x.device, step, self.global_rank, _SRD_STREAM))
        return self.srd.apply(source, side, shifts), circular_shift(x, shifts)

    def restore(self, inputs: Tensor) -> Tensor:
        return self.restorer(inputs)

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        return inputs  # already SRd + bicubic at full size: the "SRd alone" baseline

    # --- the network and the defense, from the two settings dicts the export keeps -------------
    def network_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"preset": hp.preset, "in_chans": hp.in_chans, "arch_kwargs": dict(hp.arch_kwargs or {})}

    @staticmethod
    def build_network(preset: str, in_chans: int, arch_kwargs: dict[str, Any]) -> nn.Module:
        return build_detail_generator(preset, in_chans, arch_kwargs)

    def defense_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"min_size": hp.min_size, "max_size": hp.max_size, "max_shift": hp.max_shift, "mode": hp.mode}

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> RainDefense:
        return RainDefense(network, **settings)

    @staticmethod
    def settings_from_v1(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {key: model[key] for key in ("preset", "in_chans", "arch_kwargs")}, dict(model["srd"])
