"""Restorer 5 (ours, beyond the papers): a Gaussian denoiser for a frozen classifier, the denoiser
of denoised smoothing (Salman, Sun, Yang, Kapoor and Kolter 2020). With it in front, randomized
smoothing certifies the frozen classifier (defenses/smoothing.py; certify.py).

    python train.py fit --config configs/denoiser_cifar10.yaml

Training step, top-down (the base's `training_step`):
    batch (x clean, y) -> x + N(0, sigma^2) (seeded by step and rank; not clamped, as at
    certification) -> denoiser -> frozen classifier -> loss = restoration_weight * MSE(denoised, x)
    + classifier_weight * classifier term -> logs
The classifier term (`classifier_loss`) is the paper's cross-entropy against the true label (`ce`)
or its stability loss against the classifier's label of the clean image (`stability`); weights of
zero leave either objective out, so MSE alone, the classifier term alone, or both. `init_from`
starts from another denoiser's export: the paper's best recipe trains with MSE alone first, then
fine-tunes with the classifier term (from scratch the classifier term drove the network to
saturated outputs on the shapes: docs/RESULTS.md, "Denoised smoothing").

Network: the residual U-net of restorers/unet.py. Why that shape: at sigma 0.5 and 1.0 the noise
swamps every pixel, and what the classifier needs back (the object's shape) can only be inferred
from the whole image; the U's coarse levels see it after a few convolutions, at a sixteenth of the
full-resolution cost per channel. The paper's DnCNN (17 layers at full resolution) sees 35 px at
the price of 17 full-resolution convolutions. It starts as the identity (identity_start), the
residual form DnCNN uses too: the network learns the correction, the negative of the noise.

Validation: the denoised noisy image's PSNR/SSIM and the classifier's accuracy on it (`val/acc`,
one noise draw: the base classifier that smoothing votes with), beside the same classifier on the
noisy image without the denoiser (`val/noisy_acc`). The certificate itself is certify.py's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.smoothing import GaussianSmoothing
from engine.seeding import seeded_generator
from restorers.base import RestorerModule
from restorers.registry import register_restorer
from restorers.unet import build_unet, unet_settings


@register_restorer
class DenoiserRestorer(RestorerModule):
    """A Gaussian denoiser trained with the frozen classifier in its loss. Args (besides RestorerModule's):

    sigma: the noise's standard deviation (images in [0,1]): the smoothing level it serves;
    arch: ResidualUNet's sizes (widths, blocks, identity_start);
    predict_draws, predict_alpha, batch: the PREDICT eval.py scores behind the exported defense
        (noise draws per image, the binomial test's level, noisy images per forward pass);
    init_from (RestorerModule's): a denoiser export of the same sigma and arch to start from.
    restoration_weight weighs the MSE to the clean image, classifier_weight the classifier term.
    """

    kind = "denoiser"
    restoration_name = "mse"

    def __init__(
        self,
        classifier: str,
        sigma: float = 0.25,
        arch: dict[str, Any] | None = None,
        predict_draws: int = 100,
        predict_alpha: float = 0.001,
        batch: int = 1000,
        **kwargs: Any,
    ) -> None:
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        super().__init__(classifier, **kwargs)

    def start_requirements(self) -> dict[str, Any]:
        """An `init_from` denoiser must have been trained at this sigma."""
        return {"sigma": self.hparams.sigma}

    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        """(x + sigma * e, x), e ~ N(0, I) drawn from (step, rank): the same noise on every device type."""
        generator = seeded_generator(x.device, step, self.global_rank)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.hparams.sigma * noise, x

    def restore(self, inputs: Tensor) -> Tensor:
        return self.restorer(inputs)

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        return inputs.clamp(0, 1)

    def restoration_loss(self, restored: Tensor, target: Tensor, inputs: Tensor) -> Tensor:
        """MSE to the clean image, the paper's restoration objective."""
        return F.mse_loss(restored.float(), target.float())

    def _evaluate(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """PSNR/SSIM of noisy and denoised images, the classifier's accuracy on each (one draw, seeded
        by the batch index, apart from every training step's)."""
        x, y = batch
        noisy, _ = self.make_pair(x, y, -1 - batch_idx, evaluation=True)
        denoised = self.restore(noisy).float()
        baseline = self.input_as_image(noisy, x).float()
        self._update_image_metrics(baseline, denoised, x.float(), stage)
        for name, image in (("acc", denoised), ("noisy_acc", baseline)):
            self.log(f"{stage}/{name}", (self.classifier(image).argmax(1) == y).float().mean(), batch_size=len(y))
        if batch_idx == 0 and stage == "val":
            self._log_grid(x, baseline, denoised)

    def training_attack(self) -> dict[str, Any]:
        """No attack: what the export records of the training is the noise and the objectives."""
        hp = self.hparams
        return {
            "noise": "gaussian",
            "sigma": hp.sigma,
            "restoration_loss": "mse",
            "restoration_weight": hp.restoration_weight,
            "classifier_loss": hp.classifier_loss,
            "classifier_weight": hp.classifier_weight,
        }

    # --- the network and the defense, from the two settings dicts the export keeps -------------
    def network_settings(self) -> dict[str, Any]:
        return unet_settings(self.hparams.in_chans, self.hparams.arch)

    build_network = staticmethod(build_unet)

    def defense_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"sigma": hp.sigma, "draws": hp.predict_draws, "alpha": hp.predict_alpha, "batch": hp.batch}

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> GaussianSmoothing:
        return GaussianSmoothing(network=network, **settings)
