from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from attacks import (
    AttackSettings,
    GradientAttack,
    bim,
    fgsm,
    input_gradient,
    margin,
    mi_fgsm,
    parse_attack,
    pgd,
    seeded_generator,
)
from classifiers import FrozenClassifier, load_classifier
from datamodules import render_shapes

EPS = 8 / 255


@pytest.fixture(scope="module")
def victim(shapes_victim: Path) -> FrozenClassifier:
    return load_classifier(shapes_victim)


@pytest.fixture(scope="module")
def held_out() -> tuple[Tensor, Tensor]:
    """400 images of the quick start's test split (shapes seed 1), as [0,1] floats."""
    images, labels = render_shapes(400, seed=1)
    return images.float() / 255, labels


def accuracy(model, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_pgd_drives_the_undefended_victim_to_near_zero(victim, held_out):
    x, y = held_out
    assert accuracy(victim, x, y) > 0.9
    x_adv = pgd(EPS, steps=10)(victim, x, y, seeded_generator("cpu", 0))
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert accuracy(victim, x_adv, y) < 0.05


def test_accuracy_does_not_rise_with_epsilon(victim, held_out):
    x, y = held_out
    accuracies = [
        accuracy(victim, pgd(eps / 255, steps=10)(victim, x, y, seeded_generator("cpu", 0)), y)
        if eps
        else accuracy(victim, x, y)
        for eps in (0, 1, 2, 4, 8)
    ]
    assert accuracies == sorted(accuracies, reverse=True), accuracies
    assert accuracies[0] - accuracies[-1] > 0.85


def test_our_iterates_match_foolbox_pgd(victim, held_out):
    import foolbox

    x, y = held_out[0][:100], held_out[1][:100]
    ours = GradientAttack("linf", EPS, steps=10, step_size=EPS / 4, random_start=False)(victim, x, y)
    reference = foolbox.attacks.LinfPGD(abs_stepsize=EPS / 4, steps=10, random_start=False)
    _, theirs, _ = reference(foolbox.PyTorchModel(victim, bounds=(0, 1)), x, y, epsilons=EPS)
    # Same algorithm, independent code: the iterates agree except where a gradient component
    # is so small that float rounding flips its sign.
    assert (ours != theirs).float().mean() < 1e-3
    assert accuracy(victim, ours, y) == pytest.approx(accuracy(victim, theirs, y), abs=0.02)


def test_l2_pgd_stays_in_its_ball(victim, held_out):
    x, y = held_out
    x_adv = pgd(0.5, steps=10, norm="l2")(victim, x, y, seeded_generator("cpu", 1))
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert accuracy(victim, x_adv, y) < accuracy(victim, x, y) - 0.3


@pytest.mark.parametrize("attack", [fgsm(EPS), bim(EPS), mi_fgsm(EPS)], ids=["fgsm", "bim", "mi-fgsm"])
def test_one_step_and_momentum_attacks_respect_eps_and_hurt(victim, held_out, attack):
    x, y = held_out
    x_adv = attack(victim, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert accuracy(victim, x_adv, y) < accuracy(victim, x, y) - 0.3


def test_restarts_keep_what_the_first_run_fooled_and_fool_more(victim, held_out):
    """The first of the restarts is the single run (same generator); the others must add images."""
    x, y = held_out

    def fooled(attack: GradientAttack) -> torch.Tensor:
        adversarial = attack(victim, x, y, seeded_generator("cpu", 2))
        with torch.no_grad():
            return victim(adversarial).argmax(1) != y

    one = fooled(GradientAttack("linf", 2 / 255, steps=3))
    three = fooled(GradientAttack("linf", 2 / 255, steps=3, restarts=3))
    assert (three >= one).all() and three.sum() > one.sum()


class RecordingModel(nn.Module):
    """Records every input it is called on and the margin of its (optionally noisy) logits."""

    def __init__(self, classifier: nn.Module, y: Tensor, noise: float) -> None:
        super().__init__()
        self.classifier, self.y, self.noise = classifier, y, noise
        self.generator = torch.Generator().manual_seed(0)
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(x + self.noise * torch.randn(x.shape, generator=self.generator))
        self.calls.append((x.detach().clone(), margin(logits.detach(), self.y)))
        return logits


@pytest.mark.parametrize("eot, noise", [(1, 0.0), (3, 0.05)])
def test_pgd_returns_the_iterate_of_largest_margin_averaged_over_the_draws(victim, held_out, eot: int, noise: float):
    """The reference: every iterate the attack evaluated (eot draws each, the last one included),
    its margins averaged over its draws, the largest per image. A step size of eps makes the
    iterates jump between corners of the ball, so the last one is often not the best."""
    x, y = held_out[0][:100], held_out[1][:100]
    model = RecordingModel(victim, y, noise)
    steps = 6
    attack = GradientAttack("linf", 2 / 255, steps=steps, step_size=2 / 255, eot=eot, keep_best=True)
    adversarial = attack(model, x, y, seeded_generator("cpu", 5))
    assert len(model.calls) == (steps + 1) * eot
    iterates = torch.stack([model.calls[i * eot][0] for i in range(steps + 1)])
    margins = torch.stack(
        [torch.stack([m for _, m in model.calls[i * eot : (i + 1) * eot]]).mean(0) for i in range(steps + 1)]
    )
    chosen = margins.argmax(0)
    assert torch.equal(adversarial, iterates[chosen, torch.arange(len(x))])
    assert (chosen < steps).any(), "the last iterate was the best everywhere: the test cannot tell best from last"


def test_the_margin_is_positive_exactly_where_the_image_is_misclassified():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0], [1.0, 1.0, -2.0]])
    y = torch.tensor([0, 0, 2])
    assert torch.allclose(margin(logits, y), torch.tensor([-1.0, 3.0, 3.0]))
    assert torch.equal(margin(logits, y) > 0, logits.argmax(1) != y)


def test_the_margin_loss_breaks_the_undefended_victim(victim, held_out):
    x, y = held_out
    attack = GradientAttack("linf", EPS, steps=10, loss="margin", keep_best=True)
    assert accuracy(victim, attack(victim, x, y, seeded_generator("cpu", 0)), y) < 0.05


def test_the_l2_random_start_is_uniform_in_the_ball():
    """In d dimensions a uniform point of the unit ball lies within radius r with chance r^d."""
    attack = GradientAttack("l2", eps=1.0)
    start = attack._start(torch.zeros(40_000, 1, 1, 2), seeded_generator("cpu", 0))
    radius = start.flatten(1).norm(dim=1)
    assert radius.max() <= 1 + 1e-6
    assert abs((radius <= 0.5).float().mean().item() - 0.25) < 0.01  # a uniform radius gives 0.5


def test_same_seed_same_examples_other_seed_other_examples(victim, held_out):
    x, y = held_out[0][:50], held_out[1][:50]
    attack = pgd(EPS, steps=2)
    first = attack(victim, x, y, seeded_generator("cpu", 7, 3))
    assert torch.equal(first, attack(victim, x, y, seeded_generator("cpu", 7, 3)))
    assert not torch.equal(first, attack(victim, x, y, seeded_generator("cpu", 7, 4)))


class NoisyModel(nn.Module):
    """A randomized 'defense': Gaussian noise before the classifier, drawn from its own generator."""

    def __init__(self, classifier: nn.Module, seed: int, sigma: float = 0.1) -> None:
        super().__init__()
        self.classifier = classifier
        self.sigma = sigma
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x + self.sigma * torch.randn(x.shape, generator=self.generator))


def test_eot_averages_gradients_over_draws(victim, held_out):
    x, y = held_out[0][:20], held_out[1][:20]
    single = input_gradient(NoisyModel(victim, 0), x, y, eot=1)
    averaged = input_gradient(NoisyModel(victim, 0), x, y, eot=16)
    again = input_gradient(NoisyModel(victim, 1), x, y, eot=16)
    # Averages over 16 draws agree with each other far better than single draws do.
    assert (averaged - again).norm() < 0.6 * (single - averaged).norm()
    # For a deterministic model EOT is the plain gradient.
    assert torch.allclose(input_gradient(victim, x, y, eot=4), input_gradient(victim, x, y), atol=1e-6)


@pytest.mark.parametrize("name", ["apgd-ce10", "apgd-dlr10", "autoattack"])
def test_library_attacks_perturb_every_image_of_a_randomized_model(victim, held_out, name: str):
    """pyautoattack's own loop returns an image unperturbed once one forward draw misclassifies it;
    against a randomized model every image must be attacked (and scored later on fresh draws)."""
    x, y = held_out[0][:60], held_out[1][:60]
    model = NoisyModel(victim, 0, sigma=0.3)
    with torch.no_grad():
        assert (model(x).argmax(1) != y).any(), "no image misclassified by one draw: the test would see nothing"
    _, recipe, steps, _ = parse_attack(name)
    settings = AttackSettings("linf", EPS, steps, eot=2, randomized=True)
    adversarial = recipe.build(settings)(model, x, y, None)
    moved = (adversarial - x).flatten(1).abs().amax(1)
    assert (moved > 0).all() and (moved <= EPS + 1e-6).all()


def test_apgd_on_a_randomized_model_returns_the_iterate_of_largest_margin_over_its_draws(victim, held_out):
    """The reference: every input APGD (CE, then DLR) evaluated with all its EOT draws (consecutive
    calls on one input), margins averaged over them, the largest per image. APGD's own choice rests
    on the last draw's loss alone."""
    x, y = held_out[0][:40], held_out[1][:40]
    model = RecordingModel(victim, y, noise=0.05)
    _, recipe, steps, _ = parse_attack("autoattack")
    adversarial = recipe.build(AttackSettings("linf", EPS, steps, eot=3, randomized=True))(model, x, y, None)
    groups: list[tuple[Tensor, list[Tensor]]] = []
    for inputs, margins in model.calls:
        if groups and torch.equal(groups[-1][0], inputs):
            groups[-1][1].append(margins)
        else:
            groups.append((inputs, [margins]))
    drawn = [(inputs, draws) for inputs, draws in groups if len(draws) == 3]
    assert len(drawn) > 2 * steps and len(groups) - len(drawn) == 2  # each APGD's look at the clean images
    mean_margins = torch.stack([torch.stack(draws).mean(0) for _, draws in drawn])
    chosen = mean_margins.argmax(0)
    assert torch.equal(adversarial, torch.stack([inputs for inputs, _ in drawn])[chosen, torch.arange(len(x))])


def test_bf16_autocast_attacks_as_well_as_fp32(victim, held_out):
    x, y = held_out
    attack = pgd(4 / 255, steps=5)
    fp32 = accuracy(victim, attack(victim, x, y, seeded_generator("cpu", 3)), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_bf16 = attack(victim, x, y, seeded_generator("cpu", 3))
    assert x_bf16.dtype == torch.float32
    assert accuracy(victim, x_bf16, y) <= fp32 + 0.02


def test_attacks_leave_parameter_gradients_alone(held_out):
    trainable = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    x, y = held_out[0][:8], held_out[1][:8]
    trainable(x)  # materialize the lazy layer
    pgd(EPS, steps=2)(trainable, x, y, seeded_generator("cpu", 0))
    assert all(p.grad is None for p in trainable.parameters())
