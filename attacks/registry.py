"""Attacks by name, ours and the libraries', behind one call: attack(model, x, y, generator) -> x_adv.

Names are a family, an optional step (or query) count and, for PGD, restarts: `fgsm`, `bim10`,
`pgd20`, `pgd100r5` (5 restarts: per image the run whose result has the largest margin),
`pgd-margin100r5`, `mifgsm10`, `apgd-ce` (100 steps), `apgd-dlr50`, `autoattack`, `square5000`,
`cw100`, `deepfool50`.

- fgsm, bim, pgd, pgd-margin, mifgsm: ours (attacks/gradient.py), with EOT. Both PGDs return each
  image's best iterate (largest margin, averaged over the EOT draws), not the last; `pgd` follows
  the cross-entropy, `pgd-margin` the margin max_{j != y} z_j - z_y (Carlini-Wagner's loss), which
  does not saturate once an image is confidently right or wrong.
- apgd-ce, apgd-dlr, autoattack, square: pyautoattack 0.2.0, the upstream AutoAttack code that
  RobustBench pins (100 APGD steps; `autoattack` is the `standard` version, or `rand`, APGD-CE +
  APGD-DLR with EOT 20, when the evaluated model is randomized). Against a randomized model every
  image is attacked for every step, the iterate with the largest margin over its EOT draws is
  kept, and it is scored afterwards on fresh draws (_apgd_on_every_image).
- cw (C&W-L2) and deepfool: foolbox 3.3.4. Both are minimum-norm attacks; the perturbation is
  clipped to the budget, so the accuracy is at that budget like every other row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from attacks.gradient import GradientAttack, Norm, bim, fgsm, keep_larger_margin, margin, mi_fgsm

AttackFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator | None], Tensor]


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """What a row of results records about an attack. eot: gradient draws per step (1 = none);
    randomized: the attacked model draws randomness on every call (a randomized defense the attack
    goes through), so one forward pass does not decide whether an image is fooled."""

    norm: Norm
    eps: float
    steps: int
    eot: int = 1
    seed: int = 0
    restarts: int = 1
    randomized: bool = False


@dataclasses.dataclass(frozen=True)
class AttackRecipe:
    """How to build one attack family, and what the evaluation must know about it.

    uses_gradients: False for query (black-box) attacks. iterative: a multi-step attack aiming at the
    budget's worst case, which FGSM should never beat (a sign of masked gradients); minimum-norm
    attacks clipped to the budget are not. supports_restarts: restarts mean something (a random start).
    """

    build: Callable[[AttackSettings], AttackFn]
    default_steps: int
    norms: tuple[Norm, ...]
    uses_gradients: bool = True
    supports_eot: bool = True
    fixed_steps: bool = False
    iterative: bool = True
    supports_restarts: bool = False


class ParsedAttack(NamedTuple):
    family: str
    recipe: AttackRecipe
    steps: int
    restarts: int


def _ours(make: Callable[[AttackSettings], GradientAttack]) -> Callable[[AttackSettings], AttackFn]:
    def build(settings: AttackSettings) -> AttackFn:
        attack = dataclasses.replace(make(settings), eot=settings.eot, restarts=settings.restarts)
        return lambda model, x, y, generator: attack(model, x, y, generator)

    return build


def _autoattack_norm(norm: Norm) -> str:
    return {"linf": "Linf", "l2": "L2"}[norm]


def _make_apgd(model: nn.Module, settings: AttackSettings, loss: str, device: torch.device):
    from pyautoattack.autopgd_base import APGDAttack

    return APGDAttack(
        model,
        n_iter=settings.steps,
        norm=_autoattack_norm(settings.norm),
        eps=settings.eps,
        seed=settings.seed,
        loss=loss,
        eot_iter=settings.eot,
        device=device,
    )


class _BestIterateByDraws(nn.Module):
    """Passes every call on to `model` and watches the inputs an attack evaluates: consecutive calls
    on the same input are one iterate's EOT draws. Per image it keeps the input whose margin,
    averaged over its draws, is the largest seen (`best()`), at no extra forward pass. Inputs seen
    in fewer than `draws` calls (the attack's one-draw look at the clean images) are not candidates.
    APGD itself picks its best iterate by the loss of the last draw alone, which against a
    randomized model favours a lucky draw over a robustly misclassified point."""

    def __init__(self, model: nn.Module, y: Tensor, draws: int) -> None:
        super().__init__()
        self.model, self.y, self.required_draws = model, y, draws
        self.current: Tensor | None = None
        self.margin_sum = self.draws = None
        self.best_input: Tensor | None = None
        self.best_margin = torch.full(y.shape, float("-inf"), device=y.device)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        margins = margin(logits.detach(), self.y)
        if self.current is not None and torch.equal(x.detach(), self.current):
            self.margin_sum, self.draws = self.margin_sum + margins, self.draws + 1
        else:
            self._settle()
            self.current, self.margin_sum, self.draws = x.detach().clone(), margins, 1
        return logits

    def _settle(self) -> None:
        if self.current is None or self.draws < self.required_draws:
            return
        best = self.current if self.best_input is None else self.best_input
        self.best_input, self.best_margin = keep_larger_margin(
            best, self.best_margin, self.current, self.margin_sum / self.draws
        )

    def best(self) -> Tensor:
        self._settle()
        self.current = None
        return self.best_input


def _apgd_on_every_image(settings: AttackSettings, losses: tuple[str, ...]) -> AttackFn:
    """APGD with each of `losses` on every image of a randomized model; per image, the iterate of
    all the runs whose margin averaged over its EOT draws is the largest.

    The library's own `perturb` skips an image as soon as one forward draw misclassifies it (at the
    start, or at any iterate) and keeps that image as it was then; fresh scoring draws then often
    classify it right again, and the attack looks weaker than it is (through RAIN it left 10.2%
    where PGD-20 with EOT 20 left 0.0%; auto-attack PR #104/#105). `best_loss=True` attacks every
    image for all its steps; `_BestIterateByDraws` chooses what to return. `best_loss` mode does
    not seed the random start: we do, without disturbing the caller's random state.
    """

    def run(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        watched = _BestIterateByDraws(model, y, settings.eot)
        devices = [x.device] if x.device.type == "cuda" else []
        for loss in losses:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(settings.seed)
                _make_apgd(watched, settings, loss, x.device).perturb(x, y, best_loss=True)
        return watched.best()

    return run


def _apgd(loss: str) -> Callable[[AttackSettings], AttackFn]:
    def build(settings: AttackSettings) -> AttackFn:
        if settings.randomized:
            return _apgd_on_every_image(settings, (loss,))
        return lambda model, x, y, generator: _make_apgd(model, settings, loss, x.device).perturb(x, y)

    return build


def _autoattack(settings: AttackSettings) -> AttackFn:
    """AutoAttack `standard` (the library's, unchanged) for a deterministic model; for a randomized
    one the `rand` version's attacks, APGD-CE and APGD-DLR with EOT, on every image, returning per
    image the best iterate of both by its margin over the EOT draws (_apgd_on_every_image). The
    library's `rand` run drops an image after one misclassifying draw."""
    if settings.randomized:
        return _apgd_on_every_image(settings, ("ce", "dlr"))

    def run(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        from pyautoattack import AutoAttack

        attack = AutoAttack(
            model,
            eps=settings.eps,
            norm=_autoattack_norm(settings.norm),
            seed=settings.seed,
            version="standard",
            device=x.device,
        )
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv

    return run


def _square(settings: AttackSettings) -> AttackFn:
    from pyautoattack.square import SquareAttack

    def run(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        attack = SquareAttack(
            model,
            norm=_autoattack_norm(settings.norm),
            n_queries=settings.steps,
            eps=settings.eps,
            p_init=0.8,
            seed=settings.seed,
            device=x.device,
            resc_schedule=False,
        )
        return attack.perturb(x, y)

    return run


def _foolbox(make: Callable[[AttackSettings], object]) -> Callable[[AttackSettings], AttackFn]:
    def build(settings: AttackSettings) -> AttackFn:
        import foolbox

        def run(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
            wrapped = foolbox.PyTorchModel(model.eval(), bounds=(0, 1), device=x.device)
            _, clipped, _ = make(settings)(wrapped, x, y, epsilons=settings.eps)
            return clipped

        return run

    return build


def _carlini_wagner(settings: AttackSettings) -> object:
    import foolbox

    return foolbox.attacks.L2CarliniWagnerAttack(binary_search_steps=5, steps=settings.steps, stepsize=0.01)


def _deepfool(settings: AttackSettings) -> object:
    import foolbox

    family = foolbox.attacks.LinfDeepFoolAttack if settings.norm == "linf" else foolbox.attacks.L2DeepFoolAttack
    return family(steps=settings.steps)


RECIPES: dict[str, AttackRecipe] = {
    "fgsm": AttackRecipe(_ours(lambda s: fgsm(s.eps)), 1, ("linf",), fixed_steps=True, iterative=False),
    "bim": AttackRecipe(_ours(lambda s: bim(s.eps, s.steps)), 10, ("linf",)),
    "pgd": AttackRecipe(
        _ours(lambda s: GradientAttack(s.norm, s.eps, s.steps, keep_best=True)),
        20,
        ("linf", "l2"),
        supports_restarts=True,
    ),
    "pgd-margin": AttackRecipe(
        _ours(lambda s: GradientAttack(s.norm, s.eps, s.steps, loss="margin", keep_best=True)),
        100,
        ("linf", "l2"),
        supports_restarts=True,
    ),
    "mifgsm": AttackRecipe(_ours(lambda s: mi_fgsm(s.eps, s.steps)), 10, ("linf",)),
    "apgd-ce": AttackRecipe(_apgd("ce"), 100, ("linf", "l2")),
    "apgd-dlr": AttackRecipe(_apgd("dlr"), 100, ("linf", "l2")),
    "autoattack": AttackRecipe(_autoattack, 100, ("linf", "l2"), fixed_steps=True),
    "square": AttackRecipe(_square, 5000, ("linf", "l2"), uses_gradients=False, supports_eot=False, iterative=False),
    "cw": AttackRecipe(_foolbox(_carlini_wagner), 100, ("l2",), supports_eot=False, iterative=False),
    "deepfool": AttackRecipe(_foolbox(_deepfool), 50, ("linf", "l2"), supports_eot=False, iterative=False),
}

# The family is greedy: "apgd-dlr50" is apgd-dlr with 50 steps, not apgd-dl with 50 restarts.
_NAME = re.compile(r"^(?P<family>[a-z][a-z-]*)(?P<steps>\d*)(?:r(?P<restarts>\d+))?$")


def parse_attack(name: str) -> ParsedAttack:
    """'pgd20' -> ("pgd", its recipe, 20 steps, 1 run); 'pgd100r5' -> 5 runs; the family's default
    count when no number is given."""
    match = _NAME.match(name.strip().lower())
    if not match or match["family"] not in RECIPES:
        raise ValueError(
            f"unknown attack {name!r}; families: {sorted(RECIPES)}, optionally followed by a step count (and rN "
            "restarts for pgd)"
        )
    family, recipe = match["family"], RECIPES[match["family"]]
    if match["steps"] and recipe.fixed_steps:
        raise ValueError(f"attack {family!r} has a fixed number of steps; write {family!r}")
    steps = int(match["steps"]) if match["steps"] else recipe.default_steps
    restarts = int(match["restarts"]) if match["restarts"] else 1
    if steps < 1 or restarts < 1:
        raise ValueError(f"attack {name!r} needs at least one step and one run")
    if restarts > 1 and not recipe.supports_restarts:
        restartable = sorted(name for name, other in RECIPES.items() if other.supports_restarts)
        raise ValueError(f"attack {family!r} takes no restarts (only {restartable}, whose start is random)")
    return ParsedAttack(family, recipe, steps, restarts)


def query_attacks() -> list[str]:
    """The families that only query the model's outputs (the black-box threat model's)."""
    return sorted(name for name, recipe in RECIPES.items() if not recipe.uses_gradients)
