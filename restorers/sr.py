"""Restorer 1: the super-resolution defense of Mustafa et al. (TIP 2020), trained.

    python train.py fit --config configs/sr_cifar10.yaml

Training pairs: (low-resolution input, clean image). The input is the clean image downsampled
by `scale` (bicubic, antialiased); for an `adversarial_share` of each batch it is an adversarial
image instead, made on the fly against the frozen classifier with the evaluator's PGD, wavelet
denoised as at inference, then downsampled. EDSR maps it back to full size.

The defense at inference (SuperResolutionDefense):
    x (N,C,H,W) in [0,1] -> wavelet denoising (optional) -> EDSR x scale -> (N,C,sH,sW)
    -> resize to (H,W) (bicubic, antialiased; `resize: false` keeps sH x sW) -> clamp [0,1]
All of it is differentiable, so eval.py's white-box threat model differentiates through it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.base import Defense
from defenses.wavelet import wavelet_denoise
from restorers.base import RestorerModule
from restorers.edsr import build_edsr
from restorers.registry import register_restorer


def bicubic_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of (N,C,H,W) to `size` (the degradation and the resize back)."""
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


class SuperResolutionDefense(Defense):
    """wavelet denoise -> EDSR -> resize back; wraps a trained EDSR (weights shared, not copied)."""

    def __init__(self, network: nn.Module, scale: int, denoise: bool, wavelet: dict[str, Any], resize: bool) -> None:
        super().__init__()
        self.network = network
        self.scale = scale
        self.denoise = denoise
        self.wavelet = dict(wavelet)
        self.resize = resize

    def spec(self) -> dict[str, Any]:
        return {"name": "sr", "scale": self.scale, "denoise": self.denoise, "resize": self.resize}

    def forward(self, x: Tensor) -> Tensor:
        if self.denoise:
            x = wavelet_denoise(x, **self.wavelet)
        upscaled = self.network(x)
        return (bicubic_resize(upscaled, x.shape[-2:]) if self.resize else upscaled).clamp(0, 1)


@register_restorer
class SuperResolutionRestorer(RestorerModule):
    """EDSR trained as a defense. Args (besides RestorerModule's):

    scale: upsampling factor (2, 3, 4); preset: "baseline" or "large"; arch_kwargs: overrides
        of the preset (num_blocks, num_features, res_scale, mean, bicubic_skip).
    denoise, wavelet: wavelet denoising before SR at inference and on adversarial training
        inputs; `wavelet` holds wavelet_denoise's arguments (wavelet, levels, sigma, ycbcr).
    resize: bring the SR output back to the input size at inference.
    """

    kind = "sr"

    def __init__(
        self,
        classifier: str,
        scale: int = 2,
        preset: str = "baseline",
        arch_kwargs: dict[str, Any] | None = None,
        denoise: bool = True,
        wavelet: dict[str, Any] | None = None,
        resize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(classifier, **kwargs)

    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial_part(x, y, step, evaluation)
        if self.hparams.denoise and len(x_adv):
            x_adv = wavelet_denoise(x_adv, **self.defense_settings()["wavelet"])
        source = torch.cat([x_adv, x[len(x_adv) :]])
        height, width = x.shape[-2:]
        low = bicubic_resize(source, (height // self.hparams.scale, width // self.hparams.scale)).clamp(0, 1)
        return low, x

    def restore(self, inputs: Tensor) -> Tensor:
        return self.restorer(inputs)

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        return bicubic_resize(inputs, target.shape[-2:])

    # --- the network and the defense, from the two settings dicts the export keeps -------------
    def network_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "preset": hp.preset,
            "scale": hp.scale,
            "in_chans": hp.in_chans,
            "arch_kwargs": dict(hp.arch_kwargs or {}),
        }

    @staticmethod
    def build_network(preset: str, scale: int, in_chans: int, arch_kwargs: dict[str, Any]) -> nn.Module:
        return build_edsr(preset, scale, in_chans, **arch_kwargs)

    def defense_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"scale": hp.scale, "denoise": hp.denoise, "wavelet": dict(hp.wavelet or {}), "resize": hp.resize}

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> SuperResolutionDefense:
        return SuperResolutionDefense(network, **settings)

    @staticmethod
    def settings_from_v1(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        network = {key: model[key] for key in ("preset", "scale", "in_chans", "arch_kwargs")}
        return network, {key: model[key] for key in ("scale", "denoise", "wavelet", "resize")}
