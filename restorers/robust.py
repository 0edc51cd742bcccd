"""Restorer 4 (ours, beyond the papers): a restorer adversarially trained **through itself** and
the frozen classifier, so that the pair holds against the attacker who differentiates through both.

    python train.py fit --config configs/robust_cifar10.yaml

The restorers of the papers (SR, RAIN, TRN) train on adversarials made against the classifier
alone (the gray-box view) and fall to ~0% once the attacker sees them. Here every training step
makes its adversarials the way eval.py's white-box attacker does: PGD with random start on
classifier(restorer(x')), the restorer as it is at that step (the evaluator's own GradientAttack
and DefendedClassifier). The restorer then learns to map the whole eps-ball around an image to
something the frozen classifier labels right: adversarial training of restorer + classifier in
which only the restorer moves.

Training step, top-down (`training_step`):
    batch (x clean, y) -> PGD-k through restorer + classifier on the first adversarial_share of it
    (epsilon ramped up over eps_warmup_steps) -> restorer on clean and adversarial together ->
    frozen classifier -> loss = classifier_weight * CE(restored adversarial)
                              + consistency_weight * KL(p(restored clean) || p(restored adversarial))
                              + clean_weight * CE(restored clean) + restoration_weight * L1(restored clean, x)
    -> logs (each term, the training batch's robust accuracy, the epsilon in use).
The KL term is TRADES' (Zhang et al. 2019) between the classifier's outputs on the two restored
images; the clean terms keep clean accuracy (the collapse the field notes measured lost it).

Network: the residual U-net of restorers/unet.py. Why that shape: the correction has to undo a
perturbation spread over the whole image *and* move the image to where the classifier is right,
which needs the context of the whole object, and the U gives it where width is cheap. The last
convolution starts at zero (`identity_start`): an untrained restorer is the identity, so training
starts from the victim's clean accuracy instead of from an output the classifier cannot read. The ablation in
docs/RESULTS.md ("Robust restorer") shows the collapse the field notes saw, and what prevents it:
without this start, without the epsilon ramp, or with the KL term at six times the clean terms,
the pair fell to 10-20% clean accuracy; the first thing an attacked restorer learns then is an
output that carries little of its input (the KL term is zero for a constant output).

Defense (RobustDefense): the network alone, deterministic and differentiable; BPDA's identity
stand-in is a weaker view than the white-box one, which eval.py runs too.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import GradientAttack, seeded_generator
from defenses.base import DefendedClassifier, Defense
from restorers.base import RestorerModule
from restorers.registry import register_restorer
from restorers.unet import build_unet, unet_settings

AttackThrough = Literal["restorer", "classifier"]
_VALIDATION_STREAM = 3  # keeps the white-box validation draws apart from the gray-box validation's


class RobustDefense(Defense):
    """The adversarially trained restorer in front of the classifier (weights shared, not copied)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def spec(self) -> dict[str, Any]:
        return {"name": "robust"}

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)


@register_restorer
class RobustRestorer(RestorerModule):
    """A restorer adversarially trained through itself and the frozen classifier.
    Args (besides RestorerModule's):

    arch: ResidualUNet's sizes (widths, blocks, identity_start).
    attack_through: "restorer" (PGD on classifier(restorer(x')), the white-box attacker's view:
        the point of this restorer) or "classifier" (PGD on the classifier alone, the gray-box
        training of the papers' restorers; kept for the ablation).
    eps_warmup_steps: the training epsilon grows linearly from 0 to attack_eps over these steps.
    consistency_weight: TRADES' KL between the classifier's outputs on restored clean and restored
        adversarial images; clean_weight: cross-entropy on the restored clean image.
    classifier_weight (RestorerModule's) weighs the classifier loss on the restored adversarial,
    restoration_weight the L1 between the restored clean image and the clean image, and
    adversarial_share the share of each batch attacked (> 0).
    """

    kind = "robust"

    def __init__(
        self,
        classifier: str,
        arch: dict[str, Any] | None = None,
        attack_through: AttackThrough = "restorer",
        eps_warmup_steps: int = 0,
        consistency_weight: float = 0.0,
        clean_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("adversarial_share", 1.0)
        super().__init__(classifier, **kwargs)
        if attack_through not in ("restorer", "classifier"):
            raise ValueError(f"attack_through must be 'restorer' or 'classifier', got {attack_through!r}")
        if not self.hparams.adversarial_share > 0:
            raise ValueError("the robust restorer trains on adversarials: set adversarial_share in (0, 1]")
        if eps_warmup_steps < 0:
            raise ValueError(f"eps_warmup_steps must be >= 0, got {eps_warmup_steps}")

    # --- training ---------------------------------------------------------------------------
    def training_epsilon(self, step: int) -> float:
        """attack_eps ramped linearly over the first eps_warmup_steps steps (reaching it at that step)."""
        ramp = self.hparams.eps_warmup_steps
        return self.hparams.attack_eps * (min(1.0, (step + 1) / ramp) if ramp else 1.0)

    def attacked_model(self) -> nn.Module:
        """What the training attack differentiates: classifier(restorer(.)) or the classifier alone."""
        if self.hparams.attack_through == "classifier":
            return self.classifier
        return DefendedClassifier(self.classifier, self.defense())

    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        """(the batch with its first round(adversarial_share * N) images replaced by the base's PGD
        adversarials through `attacked_model()`, x); seeded by (step, rank). In evaluation, (x, x)."""
        attacked = self.adversarial_part(x, y, step, evaluation)
        return torch.cat([attacked, x[len(attacked) :]]), x

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        terms, robust_acc = self.loss_terms(x, y, self.adversarial_part(x, y, self.global_step))
        hp = self.hparams
        weights = {
            "adversarial": hp.classifier_weight,
            "consistency": hp.consistency_weight,
            "clean": hp.clean_weight,
            "l1": hp.restoration_weight,
        }
        loss = sum(weights[name] * term for name, term in terms.items())
        # No prog_bar (RestorerModule.training_step says why).
        self.log_dict(
            {
                **{f"train/{name}": term for name, term in terms.items()},
                "train/loss": loss,
                "train/robust_acc": robust_acc,
                "train/eps": self.training_epsilon(self.global_step),
            }
        )
        return loss

    def loss_terms(self, x: Tensor, y: Tensor, adversarial: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The four loss terms (fp32 scalars) of clean x (N,C,H,W) and the adversarials (k,C,H,W) of its
        first k images, and the share of those the pair classifies right.

        adversarial: the classifier loss on the restored adversarial; consistency: KL(p(restored
        clean) || p(restored adversarial)), TRADES' term; clean: cross-entropy on the restored clean
        image; l1: the restored clean image against the clean image."""
        count = len(adversarial)
        restored = self.restore(torch.cat([x, adversarial]))  # clean and adversarial in one pass
        logits = self.classifier(restored).float()
        clean_logits, adversarial_logits = logits[: len(x)], logits[len(x) :]
        terms = {
            "adversarial": self.classifier_term_of_logits(adversarial_logits, x[:count], y[:count]),
            "consistency": F.kl_div(
                F.log_softmax(adversarial_logits, 1),
                F.log_softmax(clean_logits[:count], 1),
                log_target=True,
                reduction="batchmean",
            ),
            "clean": F.cross_entropy(clean_logits, y),
            "l1": self.restoration_loss(restored[: len(x)], x, x),
        }
        return terms, (adversarial_logits.argmax(1) == y[:count]).float().mean()

    def restore(self, inputs: Tensor) -> Tensor:
        return self.restorer(inputs)

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        return inputs

    def evaluation_pair(self, x: Tensor, y: Tensor, x_adv: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        return x_adv, x  # PSNR/SSIM of the restored gray-box adversarial against the clean image

    def _evaluate(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """The base's validation (clean, gray-box, PSNR/SSIM) and the figure this restorer is for:
        `{stage}/whitebox_acc`, Linf PGD (val_eps, val_steps) through restorer + classifier."""
        super()._evaluate(batch, batch_idx, stage)
        x, y = batch
        attack = GradientAttack("linf", self.hparams.val_eps, self.hparams.val_steps)
        model = DefendedClassifier(self.classifier, self.defense())
        with torch.enable_grad():
            x_adv = attack(model, x, y, seeded_generator(x.device, _VALIDATION_STREAM, batch_idx))
        self.log(f"{stage}/whitebox_acc", (model(x_adv).argmax(1) == y).float().mean(), batch_size=len(y))

    def training_attack(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            **super().training_attack(),
            "attack_through": hp.attack_through,
            "eps_warmup_steps": hp.eps_warmup_steps,
            "consistency_weight": hp.consistency_weight,
            "clean_weight": hp.clean_weight,
            "restoration_weight": hp.restoration_weight,
        }

    # --- the network and the defense, from the two settings dicts the export keeps -------------
    def network_settings(self) -> dict[str, Any]:
        return unet_settings(self.hparams.in_chans, self.hparams.arch)

    build_network = staticmethod(build_unet)

    def defense_settings(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> RobustDefense:
        return RobustDefense(network, **settings)
