"""Restorer 3: TRN, the two-stream restoration network of "An eye for an eye" (Hong, Kong, Hong 2022).

    python train.py fit --config configs/trn_cifar10.yaml

The input gradient that FGSM/BIM/PGD/MI-FGSM follow carries information about the perturbation
they add, so TRN restores from two streams: the (adversarial) image and the classifier's
gradient map at that image, estimated without the true label (defenses/gradient_map.py).
No code is public; the design below is ours.

Network (TwoStreamRestorationNetwork), x (N,C,H,W) in [0,1], g (N,C,H,W) in [-1,1]:
    image stream:    conv3x3(x - 0.5) -> image_blocks residual blocks   \
    gradient stream: conv3x3(g)       -> gradient_blocks residual blocks -> concat (2F channels)
    fusion block:    1x1 conv to F -> channel attention -> fusion_blocks residual blocks -> conv3x3 to C
    output:          clamp(x + correction, 0, 1); the last conv starts at zero, so TRN starts as the identity.

Training step, top-down: clean batch -> on-the-fly attacks against the frozen classifier (an
`adversarial_share` of the batch, split evenly over `attack_mix`, each with its own epsilon drawn
uniformly in (0, attack_eps]; the rest stays clean so benign accuracy holds) -> gradient maps ->
TRN -> L1 to the clean image + the classifier's loss on the restored image -> logs. Validation
restores the base module's gray-box PGD adversarials (`evaluation_pair`), so its PSNR of input
and output are measured against the clean image on adversarial inputs.

Defense (TrnDefense): gradient estimation -> TRN -> classifier. When its input requires a gradient
(a white-box attacker), the gradient map is built with create_graph, so attacks differentiate
through the estimation (double backprop); BPDA holds the gradient stream constant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attacks import RECIPES, AttackSettings, seeded_generator
from defenses.base import Defense
from defenses.gradient_map import Labelling, gradient_map
from restorers.base import RestorerModule
from restorers.blocks import ChannelAttention, ResidualBlock, conv3x3
from restorers.registry import register_restorer

TRAINING_ATTACKS = ("fgsm", "bim", "pgd", "mifgsm")  # ours: seeded, batched, input gradients only
_EPS_STREAM = 2  # keeps the epsilon draws apart from the attacks' own, which share (step, rank)


def _stream(in_chans: int, features: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_chans, features), *(ResidualBlock(features) for _ in range(blocks)))


class TwoStreamRestorationNetwork(nn.Module):
    """(image (N,C,H,W) in [0,1], gradient map (N,C,H,W) in [-1,1]) -> restored (N,C,H,W) in [0,1]."""

    def __init__(
        self,
        in_chans: int = 3,
        num_features: int = 64,
        image_blocks: int = 4,
        gradient_blocks: int = 2,
        fusion_blocks: int = 4,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        self.image_stream = _stream(in_chans, num_features, image_blocks)
        self.gradient_stream = _stream(in_chans, num_features, gradient_blocks)
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * num_features, num_features, 1),
            ChannelAttention(num_features, reduction),
            *(ResidualBlock(num_features) for _ in range(fusion_blocks)),
            conv3x3(num_features, in_chans),
        )
        nn.init.zeros_(self.fusion[-1].weight)
        nn.init.zeros_(self.fusion[-1].bias)

    def forward(self, image: Tensor, gradient: Tensor) -> Tensor:
        features = torch.cat([self.image_stream(image - 0.5), self.gradient_stream(gradient.to(image.dtype))], dim=1)
        return (image + self.fusion(features)).clamp(0, 1)


class TrnDefense(Defense):
    """Gradient map estimation -> TRN, with the classifier it estimates the gradient of.

    network: a trained TwoStreamRestorationNetwork (weights shared, not copied); the gradient
    map's settings (labelling, top_k, sign, normalize) as in training.
    """

    needs_classifier = True

    def __init__(
        self,
        network: nn.Module,
        classifier: nn.Module,
        labelling: Labelling = "predicted",
        top_k: int = 3,
        sign: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.network = network
        self.classifier = classifier
        self.labelling = labelling
        self.top_k = top_k
        self.sign = sign
        self.normalize = normalize

    def spec(self) -> dict[str, Any]:
        return {
            "name": "trn",
            "labelling": self.labelling,
            "top_k": self.top_k,
            "sign": self.sign,
            "normalize": self.normalize,
        }

    def gradient_map(self, x: Tensor, create_graph: bool) -> Tensor:
        return gradient_map(self.classifier, x, self.labelling, self.top_k, self.sign, self.normalize, create_graph)

    def forward(self, x: Tensor) -> Tensor:
        differentiate = torch.is_grad_enabled() and x.requires_grad  # a white-box attacker: double backprop
        return self.network(x, self.gradient_map(x, create_graph=differentiate))

    def surrogate(self, x: Tensor) -> Tensor:
        return self.network(x, self.gradient_map(x, create_graph=False))  # the gradient stream held constant

    def bpda(self, x: Tensor) -> Tensor:
        return self.surrogate(x)  # forward and surrogate agree on the forward pass: no second evaluation


@register_restorer
class TrnRestorer(RestorerModule):
    """TRN trained against its frozen classifier. Args (besides RestorerModule's):

    arch: TwoStreamRestorationNetwork's sizes (num_features, image_blocks, gradient_blocks,
        fusion_blocks, reduction).
    labelling, top_k, sign, normalize: the gradient map estimation (defenses/gradient_map.py).
    attack_mix: the training attacks, families of attacks/registry.py among TRAINING_ATTACKS;
        the iterative ones run `attack_steps` steps; `attack_eps` is the largest epsilon drawn.
    """

    kind = "trn"

    def __init__(
        self,
        classifier: str,
        arch: dict[str, Any] | None = None,
        labelling: Labelling = "predicted",
        top_k: int = 3,
        sign: bool = False,
        normalize: bool = True,
        attack_mix: tuple[str, ...] = TRAINING_ATTACKS,
        **kwargs: Any,
    ) -> None:
        super().__init__(classifier, **kwargs)
        if not attack_mix or any(name not in TRAINING_ATTACKS for name in attack_mix):
            raise ValueError(
                f"attack_mix takes family names among {TRAINING_ATTACKS} (steps come from attack_steps), got "
                f"{list(attack_mix)}"
            )

    def attack_mixture(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        """The batch x (N,C,H,W) in [0,1] with its first round(adversarial_share * N) images attacked:
        equal slices per attack family, one epsilon per slice drawn in (0, attack_eps]; seeded by (step, rank)."""
        hp = self.hparams
        count = round(hp.adversarial_share * len(x))
        # Epsilons come from a CPU generator: Python floats without a device sync.
        cpu_generator = seeded_generator("cpu", step, self.global_rank, _EPS_STREAM)
        eps = ((1 - torch.rand(len(hp.attack_mix), generator=cpu_generator, device="cpu")) * hp.attack_eps).tolist()
        generator = seeded_generator(x.device, step, self.global_rank)
        bounds = [count * i // len(hp.attack_mix) for i in range(len(hp.attack_mix) + 1)]
        parts = []
        with torch.enable_grad():
            for name, epsilon, start, stop in zip(hp.attack_mix, eps, bounds, bounds[1:]):
                if stop > start:
                    attack = RECIPES[name].build(AttackSettings("linf", epsilon, hp.attack_steps))
                    parts.append(attack(self.classifier, x[start:stop], y[start:stop], generator))
        return torch.cat([*parts, x[count:]])

    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        attacked = x if evaluation else self.attack_mixture(x, y, step)
        return self._two_streams(attacked), x

    def evaluation_pair(self, x: Tensor, y: Tensor, x_adv: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        return self._two_streams(x_adv), x  # validation restores its own gray-box adversarials

    def _two_streams(self, attacked: Tensor) -> Tensor:
        """attacked (N,C,H,W) in [0,1] -> (N,2C,H,W): the image and its estimated gradient map."""
        hp = self.hparams
        gradient = gradient_map(self.classifier, attacked, hp.labelling, hp.top_k, hp.sign, hp.normalize)
        return torch.cat([attacked, gradient.to(attacked.dtype)], dim=1)

    def restore(self, inputs: Tensor) -> Tensor:
        image, gradient = inputs.chunk(2, dim=1)
        return self.restorer(image, gradient)

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        return inputs.chunk(2, dim=1)[0]  # the attacked image: what the classifier would see undefended

    def training_attack(self) -> dict[str, Any]:
        return {
            **super().training_attack(),
            "attack": "+".join(self.hparams.attack_mix),
            "eps_drawn": "uniform(0, attack_eps]",
        }

    # --- the network and the defense, from the two settings dicts the export keeps -------------
    def network_settings(self) -> dict[str, Any]:
        return {"in_chans": self.hparams.in_chans, "arch": dict(self.hparams.arch or {})}

    @staticmethod
    def build_network(in_chans: int, arch: dict[str, Any]) -> nn.Module:
        return TwoStreamRestorationNetwork(in_chans, **arch)

    def defense_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"labelling": hp.labelling, "top_k": hp.top_k, "sign": hp.sign, "normalize": hp.normalize}

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> TrnDefense:
        if classifier is None:
            raise ValueError(
                "the TRN defense estimates the classifier's gradient: pass the classifier (eval.py's --classifier)"
            )
        return TrnDefense(network, classifier, **settings)

    @staticmethod
    def settings_from_v1(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"in_chans": model["in_chans"], "arch": model["arch"]}, dict(model["gradient_map"])
