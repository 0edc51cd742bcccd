"""Our own gradient attacks, shared by training (adversarial pairs made on the fly) and by
evaluation: FGSM, BIM/PGD under Linf or L2 with random start and restarts, MI-FGSM, each with
optional EOT (gradients averaged over draws of a randomized model), on the cross-entropy or the
margin loss, returning the last iterate (training's PGD, as Madry et al.) or the best one found.

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


Loss = Literal["ce", "margin"]


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-image margin max_{j != y} z_j - z_y of logits (N,K) for labels y (N,): > 0 exactly where the
    image is misclassified (the loss of Carlini and Wagner's f6, unclipped). Returns (N,) fp32."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true


def _loss(logits: Tensor, y: Tensor, loss: Loss) -> Tensor:
    if loss == "margin":
        return margin(logits, y).sum()
    return F.cross_entropy(logits.float(), y, reduction="sum")


def input_gradient_and_margin(
    model: Model, x: Tensor, y: Tensor, eot: int = 1, loss: Loss = "ce"
) -> tuple[Tensor, Tensor]:
    """Gradient of the summed fp32 `loss` with respect to x, averaged over `eot` draws, and the
    per-image margin averaged over the same draws (what the best iterate is chosen by).

    x: (N,C,H,W) float in [0,1]; y: (N,) int64. Returns (gradient shaped like x, margin (N,) fp32).
    """
    x = x.detach().requires_grad_(True)
    total = torch.zeros_like(x)
    margins = torch.zeros(len(x), device=x.device)
    for _ in range(eot):
        logits = model(x)
        (gradient,) = torch.autograd.grad(_loss(logits, y, loss), x)
        total += gradient
        margins += margin(logits.detach(), y)
    return total / eot, margins / eot


def input_gradient(model: Model, x: Tensor, y: Tensor, eot: int = 1, loss: Loss = "ce") -> Tensor:
    """Gradient of the summed fp32 `loss` (cross-entropy by default) with respect to x, averaged over
    `eot` draws. x: (N,C,H,W) float in [0,1]; y: (N,) int64. Returns a tensor shaped like x."""
    return input_gradient_and_margin(model, x, y, eot, loss)[0]


def mean_margin(model: Model, x: Tensor, y: Tensor, draws: int = 1) -> Tensor:
    """margin() of model(x) averaged over `draws` forward passes, without gradients. Returns (N,) fp32."""
    with torch.no_grad():
        return torch.stack([margin(model(x), y) for _ in range(draws)]).mean(0)


def _per_image_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class GradientAttack:
    """An iterative gradient attack; the named constructors below give the usual ones.

    norm: "linf" or "l2"; eps: the budget in that norm (images in [0,1]); steps: iterations;
    step_size: per-step length (default 2.5 * eps / steps, Madry et al.); random_start: start
    uniformly in the ball; restarts: independent runs, keeping for each image the one whose result
    has the largest margin; momentum: MI-FGSM decay (0 = none); eot: gradient draws per step;
    loss: "ce" or "margin", the loss whose gradient is followed; keep_best: return, per image, the
    iterate (the start and each step's result) with the largest margin instead of the last one.

    Margins are averaged over `eot` forward draws, so against a randomized model "best" and the
    choice between restarts rest on several draws, not on one lucky one. Tracking costs nothing
    for the steps' iterates (their logits are the gradient passes'); the last iterate takes one
    extra `eot`-draw forward. Training attacks keep the last iterate (and pay nothing extra).
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    momentum: float = 0.0
    eot: int = 1
    loss: Loss = "ce"
    keep_best: bool = False

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.loss not in ("ce", "margin"):
            raise ValueError(f"loss must be 'ce' or 'margin', got {self.loss!r}")
        if self.eps < 0 or self.steps < 1 or self.restarts < 1 or self.eot < 1:
            raise ValueError("need eps >= 0, steps >= 1, restarts >= 1 and eot >= 1")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def __call__(self, model: Model, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial examples (N,C,H,W) in [0,1] within eps of x. y: (N,) true labels."""
        best, best_margin = self._run(model, x, y, generator)
        for _ in range(self.restarts - 1):
            best, best_margin = keep_larger_margin(best, best_margin, *self._run(model, x, y, generator))
        return best

    def _run(
        self, model: Model, x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """One run from one start: (the iterate it returns, that iterate's mean margin; None when
        nothing needs it: one run that keeps its last iterate)."""
        x = x.detach()
        x_adv = self._project(x, x + self._start(x, generator)) if self.random_start else x.clone()
        best, best_margin = x_adv, torch.full((len(x),), float("-inf"), device=x.device)
        velocity = torch.zeros_like(x)
        for _ in range(self.steps):
            gradient, iterate_margin = input_gradient_and_margin(model, x_adv, y, self.eot, self.loss)
            if self.keep_best:
                best, best_margin = keep_larger_margin(best, best_margin, x_adv, iterate_margin)
            if self.momentum:
                # MI-FGSM: accumulate L1-normalized gradients (Dong et al. 2018).
                velocity = self.momentum * velocity + gradient / gradient.abs().flatten(1).mean(1).clamp_min(
                    1e-12
                ).view(-1, 1, 1, 1)
                gradient = velocity
            x_adv = self._project(x, x_adv + self.alpha * self._direction(gradient))
        if not self.keep_best and self.restarts == 1:
            return x_adv, None
        last_margin = mean_margin(model, x_adv, y, self.eot)
        if not self.keep_best:
            return x_adv, last_margin
        return keep_larger_margin(best, best_margin, x_adv, last_margin)

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


def keep_larger_margin(
    best: Tensor, best_margin: Tensor, candidate: Tensor, candidate_margin: Tensor
) -> tuple[Tensor, Tensor]:
    """Per image, the candidate where its margin is larger (ties keep the earlier one).

    best, candidate: (N,...) images; best_margin, candidate_margin: (N,). Returns (images, margins)."""
    larger = candidate_margin > best_margin
    return torch.where(larger.view(-1, *([1] * (best.ndim - 1))), candidate, best), torch.maximum(
        best_margin, candidate_margin
    )


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


def pgd(
    eps: float,
    steps: int = 10,
    norm: Norm = "linf",
    restarts: int = 1,
    eot: int = 1,
    loss: Loss = "ce",
    keep_best: bool = False,
) -> GradientAttack:
    """PGD with random start (Madry et al. 2018)."""
    return GradientAttack(norm, eps, steps, restarts=restarts, eot=eot, loss=loss, keep_best=keep_best)


def mi_fgsm(eps: float, steps: int = 10, decay: float = 1.0) -> GradientAttack:
    """Momentum iterative FGSM (Dong et al. 2018): step eps/steps, momentum `decay`."""
    return GradientAttack("linf", eps, steps, step_size=eps / steps, random_start=False, momentum=decay)
