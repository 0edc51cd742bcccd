"""Randomized smoothing (defenses/smoothing.py), the denoiser (restorers/denoiser.py) and certify.py.

The certificate is checked where it can be computed exactly: a linear classifier's smoothed
prediction is that of the classifier itself, so its true robust radius is the distance to the
hyperplane; a tiny MLP in 2-D has its smoothed class probabilities integrated on a grid, and a
brute-force search over the certified disc must not change the smoothed class.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from classifiers import load_classifier
from datamodules import render_shapes
from defenses import make_defense
from defenses.smoothing import (
    ABSTAIN,
    GaussianSmoothing,
    SmoothedPrediction,
    Smoothing,
    binomial_two_sided_p,
    clopper_pearson_lower,
)
from engine.cli import RestorationCLI
from evaluation.certification import main as certify_main
from restorers import DenoiserRestorer
from tests.conftest import REPO_ROOT, restorer_args

DENOISER_CONFIG = str(REPO_ROOT / "configs" / "denoiser_shapes.yaml")


# --- the statistics ---------------------------------------------------------------------------
def binomial_upper_tail(successes: int, trials: int, p: float) -> float:
    """P[Bin(trials, p) >= successes], summed exactly term by term."""
    return sum(math.comb(trials, i) * p**i * (1 - p) ** (trials - i) for i in range(successes, trials + 1))


@pytest.mark.parametrize(("successes", "trials"), [(1, 10), (7, 10), (50, 100), (99, 100), (180, 200)])
def test_clopper_pearson_is_the_exact_one_sided_bound(successes: int, trials: int):
    """At the lower bound p, seeing `successes` or more has probability exactly alpha (the bound's
    definition), and it is scipy's beta quantile."""
    alpha = 0.001
    bound = float(clopper_pearson_lower(np.array([successes]), trials, alpha)[0])
    assert binomial_upper_tail(successes, trials, bound) == pytest.approx(alpha, rel=1e-6)
    assert bound == pytest.approx(stats.beta.ppf(alpha, successes, trials - successes + 1), rel=1e-9)


def test_clopper_pearson_at_the_ends():
    bounds = clopper_pearson_lower(np.array([0, 100]), 100, 0.001)
    assert bounds[0] == 0.0  # no success: nothing can be said
    assert bounds[1] == pytest.approx(0.001 ** (1 / 100))  # all successes: p^n = alpha


@pytest.mark.parametrize(("top", "runner_up"), [(60, 40), (100, 0), (5, 5), (520, 480), (9, 1), (700, 3)])
def test_predicts_binomial_test_is_scipys(top: int, runner_up: int):
    expected = stats.binomtest(top, top + runner_up, 0.5).pvalue
    assert binomial_two_sided_p(np.array([top]), np.array([runner_up]))[0] == pytest.approx(expected, rel=1e-9)


# --- CERTIFY and PREDICT ---------------------------------------------------------------------
class Linear(nn.Module):
    """Two classes split by the hyperplane w.x + b = 0 on inputs (N, D)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([-score, score], dim=1)


def test_certified_radius_of_a_linear_classifier_is_below_the_true_one_and_close():
    """For a linear classifier g = f, so the true radius is the distance to the hyperplane: the
    certificate never exceeds it, and with n = 100,000 comes within 10% of it."""
    w = torch.tensor([3.0, -4.0])  # |w| = 5
    x = torch.tensor([[0.3, 0.1], [0.05, 0.0], [0.0, 0.3], [0.4, 0.4]])
    distance = ((x @ w).abs() / 5).double()
    smoothing = Smoothing(Linear(w, 0.0), sigma=0.25, batch=20_000)
    prediction, radius = smoothing.certify(x, 100, 100_000, 0.001, torch.Generator().manual_seed(0))
    assert prediction.tolist() == (x @ w > 0).long().tolist()
    assert (radius <= distance).all()
    assert (radius >= 0.9 * distance).all()


def test_abstains_on_a_coin_flip_and_certifies_a_constant_to_its_bound():
    """A base classifier that votes 50/50 makes both procedures abstain; a constant one is certified
    with p_A's lower bound alpha^(1/n), the largest radius n draws allow."""
    coin = Smoothing(Linear(torch.tensor([1.0, 0.0]), 0.0), sigma=0.5)  # x = 0 lies on the hyperplane
    constant = Smoothing(lambda x: F.one_hot(torch.full((len(x),), 3), 10).float(), sigma=0.5)
    x, generator = torch.zeros(3, 2), torch.Generator().manual_seed(1)
    assert (coin.certify(x, 100, 2000, 0.001, generator)[0] == ABSTAIN).all()
    assert (coin.predict(x, 2000, 0.001, generator) == ABSTAIN).all()
    prediction, radius = constant.certify(x, 100, 2000, 0.001, generator)
    assert (prediction == 3).all() and (constant.predict(x, 2000, 0.001, generator) == 3).all()
    assert torch.allclose(radius, torch.full((3,), 0.5 * stats.norm.ppf(0.001 ** (1 / 2000)), dtype=torch.float64))


def test_counts_are_reproducible_and_do_not_depend_on_how_images_share_a_pass():
    """Same generator seed, same counts; another seed, other counts. The vote total is the draws asked."""
    smoothing = Smoothing(Linear(torch.tensor([1.0, 1.0]), -0.5), sigma=0.5, batch=64)
    x = torch.rand(5, 2, generator=torch.Generator().manual_seed(2))
    first = smoothing.counts(x, 300, torch.Generator().manual_seed(7))
    assert torch.equal(first, smoothing.counts(x, 300, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, smoothing.counts(x, 300, torch.Generator().manual_seed(8)))
    assert (first.sum(1) == 300).all()


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 4)


def smoothed_class(model: nn.Module, points: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact smoothed class at each point (P,2): Gaussian-weighted votes on a fine grid of offsets."""
    offsets = torch.linspace(-5 * sigma, 5 * sigma, 161)
    grid = torch.cartesian_prod(offsets, offsets)
    weights = torch.exp(-(grid**2).sum(1) / (2 * sigma**2))
    with torch.no_grad():
        votes = [F.one_hot(model(point + grid).argmax(1), 3).float().T @ weights for point in points]
    return torch.stack(votes).argmax(1)


def test_no_point_in_the_certified_disc_of_a_tiny_mlp_changes_the_smoothed_class():
    """Brute force where the smoothed classifier can be computed: 32 directions x 4 radii inside each
    certified disc, the exact smoothed class at each point equals the certified one."""
    model, sigma = TinyMLP(), 0.25
    x = torch.tensor([[0.1, 0.2], [-0.3, 0.0], [0.2, -0.25]])
    prediction, radius = Smoothing(model, sigma, batch=20_000).certify(
        x, 100, 20_000, 0.001, torch.Generator().manual_seed(4)
    )
    certified = prediction != ABSTAIN
    assert certified.sum() >= 2 and (radius[certified] > 0.05).all()  # something to search
    angles = torch.linspace(0, 2 * math.pi, 33)[:-1]
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    for point, label, r in zip(x[certified], prediction[certified], radius[certified]):
        for share in (0.25, 0.5, 0.75, 0.999):
            around = point + share * float(r) * directions
            assert (smoothed_class(model, around, sigma) == label).all(), (point, share, r)


# --- the defense in eval.py ---------------------------------------------------------------------
class CornerPixel(nn.Module):
    """Class 1 where the first pixel is above 0.5, class 0 below: a coin flip on noisy grey images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x[:, 0, 0, 0] - 0.5
        return torch.stack([-score, score], dim=1)


def test_smoothing_defense_scores_predict_with_abstention_counted_wrong():
    """eval.py scores PREDICT behind the smoothing defense: grey images (a coin flip under noise) are
    abstained on and scored wrong, images with a white first pixel are predicted class 1."""
    classifier = CornerPixel()
    x = torch.full((8, 3, 4, 4), 0.5)
    x[4:, 0, 0, 0] = 1.0
    labels = torch.tensor([0, 1, 0, 1, 1, 1, 1, 1])
    defense = make_defense("smoothing:sigma=0.25,draws=50,alpha=0.001", classifier)
    assert isinstance(defense, GaussianSmoothing) and defense.randomized
    scorer = defense.scored_model(classifier)
    defense.reseed(1)
    votes = scorer(x)
    assert isinstance(scorer, SmoothedPrediction) and votes.shape == (8, 3)  # two classes and abstention
    assert votes.argmax(1).tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert (votes.argmax(1) == labels).tolist() == [False] * 4 + [True] * 4


# --- the denoiser ---------------------------------------------------------------------------------
def test_denoiser_pair_is_the_image_plus_sigma_noise_and_stability_uses_the_clean_label(shapes_victim: Path):
    module = DenoiserRestorer(str(shapes_victim), sigma=0.5, classifier_loss="stability", arch={"widths": [8, 16]})
    images, labels = render_shapes(64, seed=3)
    x = images.float() / 255
    noisy, target = module.make_pair(x, labels, step=5)
    assert torch.equal(target, x) and (noisy - x).std().item() == pytest.approx(0.5, rel=0.02)
    assert torch.equal(noisy, module.make_pair(x, labels, step=5)[0])  # seeded by the step
    restored = module.restore(noisy)
    wrong = (labels + 1) % 10
    expected = F.cross_entropy(module.classifier(restored), module.classifier(x).argmax(1))
    assert module.classifier_term(restored, x, wrong).item() == pytest.approx(expected.item())  # ignores the labels


def test_denoiser_trains_exports_and_is_certified(shapes_victim: Path, tmp_path: Path):
    """configs/denoiser_shapes.yaml for 60 steps of MSE: the denoised images are nearer the clean ones
    than the noisy ones; the export is the smoothing defense at the trained sigma; certify.py runs on it
    and on the classifier alone, writes its files, and no certified image is flipped by the check."""
    RestorationCLI(
        args=restorer_args(
            DENOISER_CONFIG, shapes_victim, tmp_path, "den", 60, "--model.init_args.classifier_weight", "0"
        )
    )
    export = tmp_path / "exports" / "den.pt"
    defense = make_defense(str(export), load_classifier(shapes_victim))
    assert isinstance(defense, GaussianSmoothing) and defense.sigma == 0.25 and defense.network is not None
    images = render_shapes(16, seed=4)[0].float() / 255
    noisy = images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert F.mse_loss(defense.denoise(noisy), images) < 0.5 * F.mse_loss(noisy.clamp(0, 1), images)

    out = tmp_path / "certify"
    arguments = ["--classifier", str(shapes_victim), "--defense", str(export), "smoothing:sigma=0.25", "--n", "20"]
    arguments += ["--selection-draws", "20", "--estimation-draws", "200", "--batch", "500", "--check-radii", "0.1"]
    arguments += ["--check-steps", "3", "--check-prediction-draws", "200", "--out", str(out), "--no-progress"]
    results = certify_main(arguments)
    assert {path.name for path in out.iterdir()} == {
        "indices.json",
        "certify.csv",
        "curve.csv",
        "results.json",
        "results.md",
        "curve.png",
    }
    rows = list(csv.DictReader((out / "certify.csv").open()))
    assert len(rows) == 40 and {row["defense"] for row in rows} == {str(export), "smoothing:sigma=0.25"}
    for summary in results["defenses"]:
        curve = [accuracy for _, accuracy in summary["curve"]]
        assert curve == sorted(curve, reverse=True)  # certified accuracy never rises with the radius
        assert all(row["flipped"] == 0 for row in summary["empirical_check"])
    certify_main([*arguments[:-3], "--out", str(tmp_path / "again"), "--no-progress"])  # the same command again
    assert (tmp_path / "again" / "certify.csv").read_text() == (out / "certify.csv").read_text()
    with pytest.raises(ValueError, match="start from a denoiser export of the same network and sigma"):
        DenoiserRestorer(str(shapes_victim), sigma=0.5, init_from=str(export))


def test_bad_certify_and_denoiser_settings_are_refused_with_the_fix(shapes_victim: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="not a smoothing defense"):
        certify_main(
            ["--classifier", str(shapes_victim), "--defense", "jpeg", "--n", "10", "--out", str(tmp_path / "a")]
        )
    with pytest.raises(ValueError, match="sigma > 0"):
        make_defense("smoothing:sigma=0")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        DenoiserRestorer(str(shapes_victim), sigma=-1)
    with pytest.raises(ValueError, match="classifier_loss must be one of"):
        DenoiserRestorer(str(shapes_victim), classifier_loss="stabilty")
