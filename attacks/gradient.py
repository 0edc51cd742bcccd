"""Our own gradient attacks, shared by training (adversarial pairs made on the fly) and by
evaluation: FGSM, BIM/PGD under Linf or L2 with random start and restarts, MI-FGSM, each with
optional EOT (gradients averaged over draws of a randomized model).

A model here is any callable x (N,C,H,W) float in [0,1] -> logits (N,K): a FrozenClassifier,
or a defense followed by one. Batched; the device is the input's. Gradients are taken with
`torch.autograd.grad` with respect to the input only: no parameter gradients are accumulated
and no DDP reducer hook fires, so attacks are safe inside training steps. The loss is summed
and computed in fp32 even under autocast: mean-reduced losses in low precision underflow
input gradients and weaken attacks. All randomness comes from an explicit torch.Generator
(engine.seeding.seeded_generator makes one from (seed, step, rank)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Model = Callable[[Tensor], Tensor]
Norm = Literal["linf", "l2"]


def input_gradient(model: Model, x: Tensor, y: Tensor, eot: int = 1) -> Tensor:
    """Gradient of the summed fp32 cross-entropy with respect to x, averaged over `eot` draws.

    x: (N,C,H,W) float in [0,1]; y: (N,) int64. Returns a tensor shaped like x.
    """
    x = x.detach().requires_grad_(True)
    total = torch.zeros_like(x)
    for _ in range(eot):
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
        total += gradient
    return total / eot


def _per_image_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class GradientAttack:
    """An iterative gradient attack; the named constructors below give the usual ones.

    norm: "linf" or "l2"; eps: the budget in that norm (images in [0,1]); steps: iterations;
    step_size: per-step length (default 2.5 * eps / steps, Madry et al.); random_start: start
    uniformly in the ball; restarts: independent runs, keeping for each image the first that
    fools the model; momentum: MI-FGSM decay (0 = none); eot: gradient draws per step.
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    momentum: float = 0.0
    eot: int = 1

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.eps < 0 or self.steps < 1 or self.restarts < 1 or self.eot < 1:
            raise ValueError("need eps >= 0, steps >= 1, restarts >= 1 and eot >= 1")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def __call__(self, model: Model, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial examples (N,C,H,W) in [0,1] within eps of x. y: (N,) true labels."""
        best = self._run(model, x, y, generator)
        if self.restarts == 1:
            return best
        fooled = self._fooled(model, best, y)
        for _ in range(self.restarts - 1):
            candidate = self._run(model, x, y, generator)
            newly = ~fooled & self._fooled(model, candidate, y)
            best = torch.where(newly.view(-1, 1, 1, 1), candidate, best)
            fooled |= newly
        return best

    @staticmethod
    def _fooled(model: Model, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x).argmax(dim=1) != y

    def _run(self, model: Model, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        x = x.detach()
        x_adv = self._project(x, x + self._start(x, generator)) if self.random_start else x.clone()
        velocity = torch.zeros_like(x)
        for _ in range(self.steps):
            gradient = input_gradient(model, x_adv, y, self.eot)
            if self.momentum:
                # MI-FGSM: accumulate L1-normalized gradients (Dong et al. 2018).
                velocity = self.momentum * velocity + gradient / gradient.abs().flatten(1).mean(1).clamp_min(
                    1e-12
                ).view(-1, 1, 1, 1)
                gradient = velocity
            x_adv = self._project(x, x_adv + self.alpha * self._direction(gradient))
        return x_adv

    def _direction(self, gradient: Tensor) -> Tensor:
        return gradient.sign() if self.norm == "linf" else gradient / _per_image_norm(gradient)

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.norm == "linf":
            return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # Uniform in the d-dimensional ball: the radius is U^(1/d), not U (which crowds the centre).
        uniform = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        radius = uniform.pow(1 / x[0].numel()).view(-1, *([1] * (x.ndim - 1)))
        return direction / _per_image_norm(direction) * radius * self.eps

    def _project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Into the eps-ball around x, then into [0,1]."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / _per_image_norm(delta)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)


def fgsm(eps: float) -> GradientAttack:
    """One signed-gradient step of size eps (Goodfellow et al. 2015)."""
    return GradientAttack("linf", eps, steps=1, step_size=eps, random_start=False)


def bim(eps: float, steps: int = 10, step_size: float | None = None) -> GradientAttack:
    """Iterative FGSM from the clean image (Kurakin et al. 2017).

    The step defaults to eps/steps, not Kurakin's 1/255: BIM-N then reaches the budget in N steps
    whatever eps is, which the few-step attacks of training rely on (configs/trn_cifar10.yaml's
    BIM-5 at up to 8/255 would move 5/255 at most with 1/255). At equal steps it is the weaker
    choice when steps/255 > eps: pass step_size=1/255 for Kurakin's, and use PGD for strength."""
    return GradientAttack("linf", eps, steps, step_size if step_size is not None else eps / steps, random_start=False)


def pgd(eps: float, steps: int = 10, norm: Norm = "linf", restarts: int = 1, eot: int = 1) -> GradientAttack:
    """PGD with random start (Madry et al. 2018)."""
    return GradientAttack(norm, eps, steps, restarts=restarts, eot=eot)


def mi_fgsm(eps: float, steps: int = 10, decay: float = 1.0) -> GradientAttack:
    """Momentum iterative FGSM (Dong et al. 2018): step eps/steps, momentum `decay`."""
    return GradientAttack("linf", eps, steps, step_size=eps / steps, random_start=False, momentum=decay)
