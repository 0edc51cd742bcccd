"""Run attacks under threat models on a fixed image subset and score them, one row at a time.

Every row is a function of (seed, row identity, batch index): the attack's generator, a
randomized defense's draws and the library attacks' seeds are all derived from them, so the
same command gives the same numbers, whatever other rows it also runs.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Iterator
from fractions import Fraction
from functools import partial

import torch
from torch import Tensor, nn

from attacks.gradient import input_gradient
from attacks.registry import AttackSettings, parse_attack
from datamodules.subset import classes_in_turn
from defenses.base import Defense, describe
from defenses.transforms import Identity
from engine.seeding import seeded_generator
from evaluation.threats import THREATS, ThreatModel, attacked_model, scored_model, skip_reason

EXAMPLES = 8  # adversarial images kept per row for the example grid
SANITY_EPS = {"linf": "32/255", "l2": "4"}  # the large budget at which every attack must reach ~0


@dataclasses.dataclass
class Row:
    """One defense x threat x attack x epsilon measurement. accuracy: mean over images (and over
    `draws` evaluations of a randomized defense, whose spread is accuracy_std)."""

    defense: str
    threat: str
    attack: str
    norm: str
    eps: float
    eps_label: str
    steps: int
    restarts: int
    eot: int
    n: int
    accuracy: float
    accuracy_std: float
    draws: int
    seconds: float
    img_per_s: float
    seed: int
    correct: Tensor = dataclasses.field(repr=False)  # (n,) per-image share of correct draws
    correct_every_draw: Tensor = dataclasses.field(repr=False)  # (n,) 1 where every draw was correct
    examples: Tensor = dataclasses.field(repr=False)  # (<=EXAMPLES,C,H,W) adversarial images

    def record(self) -> dict:
        """The row as plain JSON values (without the per-image tensors)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("correct", "correct_every_draw", "examples")
        }


@dataclasses.dataclass(frozen=True)
class Skipped:
    defense: str
    threat: str
    attack: str
    reason: str


class AutocastModel(nn.Module):
    """Runs `model` (a classifier or a restorer's network) under autocast to `dtype` on the input's
    device and returns fp32 outputs, so that attack losses and their input gradients stay in fp32
    (field notes: fp16 underflows)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: Tensor, *more: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, *more).float()


def seed_name(defense: Defense | None) -> str:
    """What a row's random draws are keyed by: the defense's spec, not its label, which depends on the
    other defenses of the run (adding a defense to a run must not change another's numbers)."""
    return describe(defense.spec()) if defense is not None else "none"


def text_key(*parts: object) -> int:
    """An integer seed key from readable parts (crc32 of their text): rows and draws keyed by what they are."""
    return zlib.crc32("|".join(map(str, parts)).encode())


BatchSource = Callable[[int, int, Callable[[], Tensor]], tuple[Tensor, float]]


def computed_batch(row_key: int, index: int, compute: Callable[[], Tensor]) -> tuple[Tensor, float]:
    """The BatchSource that computes every batch: (compute(), its seconds)."""
    started = time.perf_counter()
    x_adv = compute()
    return x_adv, time.perf_counter() - started


class Evaluator:
    """Scores defenses in front of `classifier` on images (N,C,H,W) in [0,1] with labels (N,).

    eval_draws: evaluations averaged per image for a randomized defense; eot: gradient draws per
    attack step when the attacker's model contains a randomized defense; source: the transfer
    classifier; progress: a tqdm bar advanced once per batch; batches: gives each attacked batch
    (evaluation.journal.BatchJournal.batch keeps the batches of long rows).
    """

    def __init__(
        self,
        classifier: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        seed: int,
        batch_size: int,
        eval_draws: int,
        eot: int,
        source: nn.Module | None = None,
        progress: object | None = None,
        batches: BatchSource = computed_batch,
    ) -> None:
        self.classifier = classifier
        self.images = images
        self.labels = labels
        self.source = source
        self.seed = seed
        self.batch_size = batch_size
        self.eval_draws = eval_draws
        self.eot = eot
        self.progress = progress
        self.batches = batches
        # The example grid's images: all classes, not the first (class-sorted) ones.
        self.example_positions: list[int] = classes_in_turn(labels, EXAMPLES).tolist()
        self._shared: tuple[tuple, list[Tensor], float] | None = None

    @property
    def batches_per_row(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def row_done_elsewhere(self) -> None:
        """Move the progress bar past a row whose batches are not attacked here (reused, skipped,
        already clean, or read back by a journal)."""
        if self.progress is not None:
            self.progress.update(self.batches_per_row)

    def _batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        for index, start in enumerate(range(0, len(self.labels), self.batch_size)):
            yield index, self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]

    def _score(self, model: nn.Module, defense: Defense | None, x: Tensor, y: Tensor, keys: tuple[int, ...]) -> Tensor:
        """(draws, batch) float correctness of `model` on x."""
        draws = self.eval_draws if defense is not None and defense.randomized else 1
        scores = []
        with torch.no_grad():
            for draw in range(draws):
                if defense is not None:
                    defense.reseed(*keys, draw + 1)
                scores.append((model(x).argmax(1) == y).float())
        return torch.stack(scores)

    def _adversarials(self, key: tuple, shareable: bool, run: Callable) -> tuple[list[Tensor], float]:
        """Per batch run(x, y, generator, keys) -> x_adv, and the seconds it took. An attack that never
        sees the defense (gray-box, transfer, none) is shareable: its last result is reused for the
        next defense instead of being recomputed."""
        if shareable and self._shared is not None and self._shared[0] == key:
            self.row_done_elsewhere()
            return self._shared[1], self._shared[2]
        adversarials, seconds, row_key = [], 0.0, text_key(*key)
        for index, x, y in self._batches():
            keys = (self.seed, row_key, index)
            x_adv, batch_seconds = self.batches(
                row_key, index, partial(run, x, y, seeded_generator(x.device, *keys), keys)
            )
            adversarials.append(x_adv.to(x.device))
            seconds += batch_seconds
            if self.progress is not None:
                self.progress.update(1)
        self._shared = (key, adversarials, seconds) if shareable else None
        return adversarials, seconds

    def _row(
        self,
        scorer: nn.Module,
        defense: Defense | None,
        threat: str,
        attack: str,
        settings: AttackSettings,
        eps_label: str,
        adversarials: list[Tensor],
        attack_seconds: float,
    ) -> Row:
        """Score the adversarial batches; seconds = the attack's time plus the scoring's."""
        started, label = time.perf_counter(), defense.label if defense else "none"
        row_key = text_key("score", seed_name(defense), threat, attack, settings.norm, settings.eps)
        scores = [
            self._score(scorer, defense, x_adv, y, (self.seed, row_key, index))
            for (index, _, y), x_adv in zip(self._batches(), adversarials)
        ]
        seconds = attack_seconds + time.perf_counter() - started
        per_draw = torch.cat(scores, dim=1)  # (draws, n)
        accuracy_per_draw = per_draw.mean(1)
        return Row(
            defense=label,
            threat=threat,
            attack=attack,
            norm=settings.norm,
            eps=settings.eps,
            eps_label=eps_label,
            steps=settings.steps,
            restarts=settings.restarts,
            eot=settings.eot,
            n=per_draw.shape[1],
            accuracy=accuracy_per_draw.mean().item(),
            accuracy_std=accuracy_per_draw.std().item() if len(accuracy_per_draw) > 1 else 0.0,
            draws=len(accuracy_per_draw),
            seconds=round(seconds, 3),
            img_per_s=round(per_draw.shape[1] / seconds, 1),
            seed=self.seed,
            correct=per_draw.mean(0).cpu(),
            correct_every_draw=per_draw.amin(0).cpu(),
            examples=self._examples(adversarials),
        )

    def _examples(self, adversarials: list[Tensor]) -> Tensor:
        """The example images (<=EXAMPLES,C,H,W) on the CPU, picked from their batches (no copy of the rest)."""
        size = self.batch_size
        return torch.stack([adversarials[at // size][at % size] for at in self.example_positions]).cpu()

    def clean(self, defense: Defense | None) -> Row:
        """Accuracy on unperturbed images: the classifier alone (defense None) or behind the defense."""
        scorer = self.classifier if defense is None else scored_model(_DEFENDED, self.classifier, defense)
        threat = "none" if defense is None else "clean"
        images = [x for _, x, _ in self._batches()]
        self.row_done_elsewhere()
        return self._row(scorer, defense, threat, "clean", AttackSettings("linf", 0.0, 0), "0", images, 0.0)

    def attack(
        self, defense: Defense, threat: ThreatModel, attack: str, norm: str, eps: float, eps_label: str
    ) -> Row | Skipped:
        """One row: `attack` (a registry name) at `eps` in `norm` under `threat`."""
        family, recipe, steps, restarts = parse_attack(attack)
        label = defense.label if threat.defended else "none"
        reason = skip_reason(threat, recipe, defense, self.source is not None)
        if reason is None and norm not in recipe.norms:
            reason = f"{family} is defined for {'/'.join(recipe.norms)} only"
        if reason is not None:
            self.row_done_elsewhere()
            return Skipped(label, threat.name, attack, reason)
        randomized = defense.randomized and threat.through_defense
        eot = self.eot if randomized and recipe.supports_eot else 1
        attacker = attacked_model(threat, self.classifier, defense, self.source)

        def run(x: Tensor, y: Tensor, generator: torch.Generator, keys: tuple[int, ...]) -> Tensor:
            defense.reseed(*keys, 0)
            settings = AttackSettings(
                norm, eps, steps, eot, seed=text_key(*keys) % 2**31, restarts=restarts, randomized=randomized
            )
            return recipe.build(settings)(attacker, x, y, generator).detach()

        shareable = not threat.through_defense
        attack_key = ("shared" if shareable else seed_name(defense), threat.name, attack, norm, eps)
        adversarials, seconds = self._adversarials(attack_key, shareable, run)
        scorer, scored_defense = scored_model(threat, self.classifier, defense), defense if threat.defended else None
        settings = AttackSettings(norm, eps, steps, eot, restarts=restarts)
        return self._row(scorer, scored_defense, threat.name, attack, settings, eps_label, adversarials, seconds)

    def zero_gradient_share(self, defense: Defense, threat: ThreatModel, limit: int = 64) -> float:
        """Share of images (`limit` of them, the classes in turn) whose input gradient through the
        attacker's model is exactly 0."""
        model = attacked_model(threat, self.classifier, defense, self.source)
        defense.reseed(self.seed, text_key("gradient-check"))
        positions = classes_in_turn(self.labels, limit)
        gradient = input_gradient(model, self.images[positions], self.labels[positions])
        return (gradient.flatten(1).abs().amax(1) == 0).float().mean().item()


# The clean row of a defense is scored like every defended threat model.
_DEFENDED = ThreatModel("clean", "no attack; score classifier+defense", "classifier")


def parse_eps(text: str) -> tuple[float, str]:
    """'8/255' -> (0.03137..., '8/255'); '0.5' -> (0.5, '0.5')."""
    value = float(Fraction(text.strip()))
    if value < 0:
        raise ValueError(f"epsilon must be >= 0, got {text!r}")
    return value, text.strip()


RowSource = Callable[[tuple, Callable[[], "Row | Skipped"]], "Row | Skipped"]


def computed(key: tuple, compute: Callable[[], Row | Skipped]) -> Row | Skipped:
    """The RowSource that computes every row (evaluation.journal.RowJournal.row reuses stored ones)."""
    return compute()


def run_rows(
    evaluator: Evaluator,
    defenses: list[Defense],
    threats: list[ThreatModel],
    attacks: list[str],
    norm: str,
    budgets: list[tuple[float, str]],
    rows_from: RowSource = computed,
) -> tuple[list[Row], list[Skipped]]:
    """Clean rows, then every threat x attack x epsilon; the undefended threat once, not per defense.
    `rows_from(key, compute)` gives each row (a journal returns the rows a killed run finished)."""
    rows: list[Row] = [rows_from(("clean", "none"), partial(evaluator.clean, None))]
    rows += [rows_from(("clean", defense.label), partial(evaluator.clean, defense)) for defense in defenses]
    skipped: list[Skipped] = []
    for threat in threats:
        for attack in attacks:
            for eps, label in budgets:
                # Defenses innermost: an attack that never sees the defense is computed once for all.
                for defense in [Identity()] if not threat.defended else defenses:
                    key = ("attack", defense.label, threat.name, attack, norm, eps)
                    result = rows_from(key, partial(evaluator.attack, defense, threat, attack, norm, eps, label))
                    (skipped if isinstance(result, Skipped) else rows).append(result)
    return rows, list(dict.fromkeys(skipped))


def sanity_rows(
    evaluator: Evaluator, defenses: list[Defense], norm: str, count: int, rows_from: RowSource = computed
) -> list[Row]:
    """PGD-20 at a large budget on `count` images, the classes in turn: undefended, and through each
    defense adaptively."""
    if count == 0:
        return []
    eps, label = parse_eps(SANITY_EPS[norm])
    positions = classes_in_turn(evaluator.labels, count)
    small = Evaluator(
        evaluator.classifier,
        evaluator.images[positions],
        evaluator.labels[positions],
        seed=evaluator.seed,
        batch_size=evaluator.batch_size,
        eval_draws=evaluator.eval_draws,
        eot=evaluator.eot,
    )
    sanity = partial(small.attack, norm=norm, eps=eps, eps_label=label, attack="pgd20")
    rows = [rows_from(("sanity", "none"), partial(sanity, Identity(), THREATS["none"]))]
    for defense in defenses:
        threat = THREATS["white-box" if defense.differentiable else "bpda"]
        rows.append(rows_from(("sanity", defense.label), partial(sanity, defense, threat)))
    return [row for row in rows if isinstance(row, Row)]


def zero_gradient_shares(evaluator: Evaluator, defenses: list[Defense], threats: list[ThreatModel]) -> dict[str, float]:
    shares = {}
    for defense in defenses:
        for threat in threats:
            if threat.through_defense and not threat.queries_only and (defense.differentiable or threat.name == "bpda"):
                shares[f"{defense.label} / {threat.name}"] = evaluator.zero_gradient_share(defense, threat)
    return shares
