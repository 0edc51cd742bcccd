"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019) of classifier(denoiser(.)), and with a
denoiser trained for the frozen classifier, denoised smoothing (Salman, Sun, Yang, Kapoor and
Kolter 2020).

The smoothed classifier g(x) = argmax_c P[f(x + e) = c], e ~ N(0, sigma^2 I), f = classifier after
the denoiser, is constant on the L2 ball of radius sigma * Phi^-1(p_A) around x wherever the top
class has probability p_A > 1/2 under the noise. `Smoothing` estimates that with Monte-Carlo counts
(batched over images and draws, on the input's device) and implements Cohen et al.'s two
procedures: CERTIFY (n0 draws choose the class, n fresh draws bound its probability from below with
Clopper-Pearson at level alpha; abstain when the bound is not above 1/2) and PREDICT (a two-sided
binomial test between the two top classes; abstain when it cannot reject at alpha).

`GaussianSmoothing` is the same pipeline as an eval.py defense: its forward is one noisy draw
through the denoiser (what the attacker differentiates; eval.py averages draws with EOT), and what
eval.py scores behind it is PREDICT, abstention counted as wrong. `SoftSmoothedClassifier` is the
smoothed soft classifier that SmoothAdv (Salman et al. 2019) attacks; the project's PGD on it is
their attack (certify.py's empirical check).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from defenses.base import Defense

ABSTAIN = -1  # the prediction of an image the smoothed classifier abstains on


def clopper_pearson_lower(successes: np.ndarray | Tensor, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion, per entry of
    `successes` (counts in 0..trials): the alpha quantile of Beta(k, trials - k + 1), 0 where k = 0."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # Beta(0, .) is undefined: k = 0 is the bound 0
        bound = stats.beta.ppf(alpha, k, trials - k + 1)
    return np.where(k > 0, bound, 0.0)


def binomial_two_sided_p(top: np.ndarray | Tensor, runner_up: np.ndarray | Tensor) -> np.ndarray:
    """p-value of the two-sided binomial test of `top` successes in `top + runner_up` trials at p = 1/2
    (PREDICT's test; scipy.stats.binomtest's value, vectorized): 2 P[Bin <= min] capped at 1."""
    top, runner_up = np.asarray(top, dtype=np.int64), np.asarray(runner_up, dtype=np.int64)
    return np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(top, runner_up), top + runner_up, 0.5))


def noisy_copies(x: Tensor, copies: int, sigma: float, generator: torch.Generator) -> Tensor:
    """x (B,C,H,W) -> (B * copies, C,H,W): each image `copies` times plus fresh N(0, sigma^2) noise,
    image-major (the copies of image 0 first); not clamped."""
    noise = torch.randn((len(x), copies, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    return (x[:, None] + sigma * noise).flatten(0, 1)


def predict_from_counts(counts: Tensor, alpha: float) -> Tensor:
    """PREDICT's decision from vote counts (B,K): (B,) int64, the top class, or ABSTAIN where the two-sided
    binomial test between the two top classes cannot reject a tie at alpha."""
    top_two = counts.topk(2, dim=1)
    values = top_two.values.cpu().numpy()
    sure = torch.from_numpy(binomial_two_sided_p(values[:, 0], values[:, 1]) <= alpha).to(counts.device)
    return torch.where(sure, top_two.indices[:, 0], ABSTAIN)


class Smoothing:
    """Monte-Carlo randomized smoothing of `base` (a callable: images (N,C,H,W) -> logits (N,K)).

    sigma: the noise's standard deviation (images in [0,1]); batch: noisy images per forward pass of
    `base`, spread over as many images as fit (many images per pass when the draws per image are few).
    """

    def __init__(self, base: Callable[[Tensor], Tensor], sigma: float, batch: int = 1000) -> None:
        if sigma <= 0 or batch < 1:
            raise ValueError(f"need sigma > 0 and batch >= 1, got sigma={sigma}, batch={batch}")
        self.base = base
        self.sigma = sigma
        self.batch = batch

    def counts(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """(B,K) int64 on x's device: for each image of x (B,C,H,W), how often base(x + sigma e) chose
        each class in `draws` draws. No host synchronisation: the caller reads the counts once."""
        chunks = [
            self._counts(x[start : start + self.batch], draws, generator) for start in range(0, len(x), self.batch)
        ]
        return torch.cat(chunks)

    def _counts(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        per_pass = max(1, self.batch // len(x))
        totals: Tensor | None = None
        for done in range(0, draws, per_pass):
            count = min(per_pass, draws - done)
            with torch.no_grad():
                logits = self.base(noisy_copies(x, count, self.sigma, generator))
            votes = F.one_hot(logits.argmax(1).view(len(x), count), logits.shape[1]).sum(1)
            totals = votes if totals is None else totals + votes
        assert totals is not None, "draws >= 1"
        return totals

    def predict(self, x: Tensor, draws: int, alpha: float, generator: torch.Generator) -> Tensor:
        """Cohen et al.'s PREDICT for each image of x (B,C,H,W): (B,) int64, the top class of `draws`
        noisy votes, or ABSTAIN where the binomial test cannot tell it from the runner-up at alpha."""
        return predict_from_counts(self.counts(x, draws, generator), alpha)

    def certify(
        self, x: Tensor, selection_draws: int, estimation_draws: int, alpha: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Cohen et al.'s CERTIFY for each image of x (B,C,H,W): (prediction (B,) int64 or ABSTAIN,
        certified L2 radius (B,) float64, 0 where abstaining), both on the CPU.

        The class is the top vote of `selection_draws` draws; `estimation_draws` fresh draws bound its
        probability p_A from below (Clopper-Pearson, level alpha); radius = sigma * Phi^-1(p_A lower)."""
        chosen = self.counts(x, selection_draws, generator).argmax(1)
        votes = self.counts(x, estimation_draws, generator).gather(1, chosen[:, None]).squeeze(1)
        lower = clopper_pearson_lower(votes.cpu().numpy(), estimation_draws, alpha)
        certified = torch.from_numpy(lower > 0.5)
        radius = torch.from_numpy(self.sigma * stats.norm.ppf(np.maximum(lower, 0.5)))
        return torch.where(certified, chosen.cpu(), ABSTAIN), torch.where(certified, radius, 0.0)


class GaussianSmoothing(Defense):
    """Randomized smoothing at `sigma` as a defense: x (N,C,H,W) in [0,1] -> denoise(x + sigma e) in
    [0,1], one draw per call; eval.py scores PREDICT (`draws`, `alpha`) behind it, abstention wrong.

    network: the denoiser (restorers/denoiser.py builds this defense around it) or None: the noisy
    image clamped to [0,1] goes to the classifier as it is (Cohen et al.'s smoothing of a frozen
    classifier, the baseline denoised smoothing improves on). batch: noisy images per forward pass.
    """

    randomized = True

    def __init__(
        self,
        sigma: float = 0.25,
        draws: int = 1000,
        alpha: float = 0.001,
        batch: int = 1000,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if sigma <= 0 or draws < 2 or not 0 < alpha < 1 or batch < 1:
            raise ValueError(
                f"smoothing needs sigma > 0, draws >= 2, 0 < alpha < 1 and batch >= 1; got sigma={sigma}, "
                f"draws={draws}, alpha={alpha}, batch={batch}"
            )
        self.sigma, self.draws, self.alpha, self.batch = sigma, draws, alpha, batch
        self.network = network

    def spec(self) -> dict[str, Any]:
        name = "smoothing" if self.network is None else "denoiser"  # a restorer's defense is named by its kind
        return {"name": name, "sigma": self.sigma, "draws": self.draws, "alpha": self.alpha, "batch": self.batch}

    def denoise(self, noisy: Tensor) -> Tensor:
        """Noisy images x + sigma e (N,C,H,W), not clamped -> (N,C,H,W) in [0,1]."""
        return noisy.clamp(0, 1) if self.network is None else self.network(noisy)

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator(x.device), device=x.device, dtype=x.dtype)
        return self.denoise(x + self.sigma * noise)

    def smoothing(self, classifier: nn.Module) -> Smoothing:
        """The smoothed classifier of classifier(denoise(.)) at this defense's sigma."""
        return Smoothing(lambda noisy: classifier(self.denoise(noisy)), self.sigma, self.batch)

    def scored_model(self, classifier: nn.Module) -> nn.Module:
        return SmoothedPrediction(classifier, self)


class SmoothedPrediction(nn.Module):
    """PREDICT as a model eval.py scores: x (N,C,H,W) in [0,1] -> (N,K+1) one-hot votes, the last
    column for abstention (no label is K, so an abstention is never right). The draws come from the
    defense's generator (eval.py reseeds it per batch and draw)."""

    def __init__(self, classifier: nn.Module, defense: GaussianSmoothing) -> None:
        super().__init__()
        self.classifier = classifier
        self.defense = defense

    def forward(self, x: Tensor) -> Tensor:
        smoothing = self.defense.smoothing(self.classifier)
        counts = smoothing.counts(x, self.defense.draws, self.defense.generator(x.device))
        prediction, classes = predict_from_counts(counts, self.defense.alpha), counts.shape[1]
        return F.one_hot(torch.where(prediction == ABSTAIN, classes, prediction), classes + 1).float()


class SoftSmoothedClassifier(nn.Module):
    """x (N,C,H,W) in [0,1] -> (N,K) log of the mean over `draws` noise draws of
    softmax(classifier(denoise(x + sigma e))), fresh draws per call from `generator`.

    These are log-probabilities, so cross-entropy on them is -log of the smoothed soft classifier's
    probability of the label: SmoothAdv's loss (Salman et al. 2019), and PGD on this model is their
    attack on the smoothed classifier."""

    def __init__(
        self, classifier: nn.Module, defense: GaussianSmoothing, draws: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.defense = defense
        self.draws = draws
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        noisy = noisy_copies(x, self.draws, self.defense.sigma, self.generator)
        log_probs = F.log_softmax(self.classifier(self.defense.denoise(noisy)).float(), 1).view(len(x), self.draws, -1)
        return torch.logsumexp(log_probs, dim=1) - math.log(self.draws)
