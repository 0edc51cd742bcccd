from __future__ import annotations

import argparse
import csv
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from attacks import RECIPES, AttackSettings, parse_attack, seeded_generator
from classifiers import load_classifier
from datamodules import SHAPE_CLASSES, render_shapes
from datamodules.subset import balanced_indices, classes_in_turn
from defenses import Defense, make_defense
from engine.export import atomic_save
from evaluation import cli as evaluator_cli
from evaluation import runner
from evaluation.journal import BatchJournal, RowJournal
from evaluation.report import sanity_warnings, worst_case
from evaluation.runner import EXAMPLES, Evaluator, Row, sanity_rows
from evaluation.subset import index_hash, index_record, read_index_record
from evaluation.threats import THREATS
from restorers import restorer_class
from tests.conftest import REPO_ROOT
from tests.data_files import write_data_set

ROW_FIELDS = {
    "defense",
    "threat",
    "attack",
    "norm",
    "eps",
    "eps_label",
    "steps",
    "restarts",
    "eot",
    "n",
    "accuracy",
    "accuracy_std",
    "draws",
    "seconds",
    "img_per_s",
    "seed",
}
ROBUSTBENCH_FIELDS = {
    "name",
    "dataset",
    "architecture",
    "threat_model",
    "eps",
    "clean_acc",
    "robust_acc",
    "autoattack_acc",
}


def evaluate(victim: Path, out: Path, *extra: str) -> dict:
    return evaluator_cli.main(
        ["--classifier", str(victim), "--data", "shapes", "--out", str(out), "--no-progress", *extra]
    )


@pytest.fixture(scope="module")
def baseline_run(shapes_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval") / "baselines"
    results = evaluate(
        shapes_victim,
        out,
        "--defense",
        "bit_depth:bits=4",
        "random_resize_pad:max_pad=4",
        "--attacks",
        "fgsm,pgd10",
        "--threats",
        "none,gray-box,white-box,bpda",
        "--eps",
        "4/255,8/255",
        "--n",
        "100",
        "--eot",
        "2",
        "--eval-draws",
        "2",
    )
    return out, results


def test_results_files_have_the_documented_fields(baseline_run):
    out, results = baseline_run
    for name in ("results.json", "results.csv", "results.md", "eps_accuracy.png", "examples.png", "indices.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == results
    assert all(set(row) == ROW_FIELDS for row in results["rows"])
    assert {row["threat"] for row in results["rows"]} == {"none", "clean", "gray-box", "white-box", "bpda"}
    with open(out / "results.csv") as stream:
        assert len(list(csv.DictReader(stream))) == len(results["rows"])
    assert all(ROBUSTBENCH_FIELDS <= set(case) for case in results["worst_case"])
    assert {"command", "commit", "date", "device", "index_hash", "classifier_sha256"} <= set(results["meta"])
    assert (out / "eps_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| defense | threat | attack |" in (out / "results.md").read_text()


def test_the_evaluation_is_honest_about_each_threat_model(baseline_run):
    _, results = baseline_run
    rows = {(r["defense"], r["threat"], r["attack"], r["eps_label"]): r for r in results["rows"]}
    assert rows[("none", "none", "pgd10", "8/255")]["accuracy"] < 0.05
    # Bit depth has no exact gradient: white-box is skipped with the reason, BPDA breaks it.
    assert any(s["threat"] == "white-box" and "bpda" in s["reason"] for s in results["skipped"])
    assert rows[("bit_depth(bits=4)", "bpda", "pgd10", "8/255")]["accuracy"] < 0.05
    # The randomized defense is attacked with EOT and scored over several draws.
    randomized = rows[("random_resize_pad(max_pad=4)", "white-box", "pgd10", "8/255")]
    assert randomized["eot"] == 2 and randomized["draws"] == 2
    assert rows[("random_resize_pad(max_pad=4)", "gray-box", "pgd10", "8/255")]["eot"] == 1
    assert all(row["accuracy"] < 0.05 for row in results["sanity"]["large_eps_rows"])


def test_indices_are_class_balanced_and_hashed(baseline_run):
    out, results = baseline_run
    record = json.loads((out / "indices.json").read_text())
    labels = render_shapes(2000, seed=1)[1][torch.tensor(record["indices"])]
    assert torch.bincount(labels, minlength=10).tolist() == [10] * 10
    assert record["hash"] == results["meta"]["index_hash"] == index_hash("shapes", torch.tensor(record["indices"]))


def test_worst_case_is_pointwise_over_attacks(baseline_run):
    _, results = baseline_run
    by_key = {(r["defense"], r["threat"], r["attack"], r["eps_label"]): r["accuracy"] for r in results["rows"]}
    for case in results["worst_case"]:
        members = [by_key[(case["name"], case["threat"], attack, case["eps"])] for attack in case["attacks"]]
        clean = by_key[(case["name"], "clean" if case["name"] != "none" else "none", "clean", "0")]
        # two decimals in RobustBench files
        assert float(case["robust_acc"]) <= float(case["robust_acc_mean_draws"]) + 0.005
        assert float(case["robust_acc_mean_draws"]) <= 100 * min([*members, clean]) + 0.005


def test_same_seed_same_numbers(shapes_victim: Path, tmp_path: Path):
    arguments = [
        "--defense",
        "random_resize_pad",
        "--attacks",
        "pgd5",
        "--threats",
        "gray-box,bpda",
        "--n",
        "40",
        "--eot",
        "2",
        "--eval-draws",
        "2",
    ]
    first = evaluate(shapes_victim, tmp_path / "a", *arguments)
    second = evaluate(shapes_victim, tmp_path / "b", *arguments)
    third = evaluate(shapes_victim, tmp_path / "c", *arguments, "--seed", "1")

    def accuracies(results: dict) -> list[float]:
        return [row["accuracy"] for row in results["rows"]]

    assert accuracies(first) == accuracies(second)
    assert first["meta"]["index_hash"] != third["meta"]["index_hash"]


def test_refuses_to_overwrite_results(shapes_victim: Path, tmp_path: Path):
    arguments = ["--attacks", "fgsm", "--threats", "none", "--n", "20"]
    evaluate(shapes_victim, tmp_path / "run", *arguments)
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(SystemExit, match="already holds results.*--overwrite"):
        evaluate(shapes_victim, tmp_path / "run", *arguments)
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    evaluate(shapes_victim, tmp_path / "run", *arguments, "--overwrite")


class Payload:
    """Stands for any object a pickle can smuggle in."""


def test_foreign_pickles_are_refused(shapes_victim: Path, tmp_path: Path):
    """eval.py refuses them as bad input: one error line (SystemExit), nothing written."""
    foreign = tmp_path / "foreign.pt"
    with open(foreign, "wb") as stream:
        pickle.dump({"state_dict": Payload()}, stream)
    with pytest.raises(SystemExit, match="weights-only loading rejects it"):
        evaluate(foreign, tmp_path / "a", "--n", "20")
    with pytest.raises(SystemExit, match="weights-only loading rejects it"):
        evaluate(shapes_victim, tmp_path / "b", "--n", "20", "--defense", str(foreign))
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(SystemExit, match="not an export of this project"):
        evaluate(plain, tmp_path / "c", "--n", "20")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_stored_index_lists_are_checked(tmp_path: Path):
    labels = torch.arange(10).repeat_interleave(30)  # sorted by class, like an ImageFolder tree
    indices = balanced_indices(labels, 50, seed=0)
    assert torch.bincount(labels[indices]).tolist() == [5] * 10
    path = tmp_path / "indices.json"
    path.write_text(json.dumps(index_record("cifar10", indices, 0)))
    assert torch.equal(read_index_record(path, "cifar10", len(labels)), indices)
    with pytest.raises(ValueError, match="not 'svhn'"):
        read_index_record(path, "svhn", len(labels))
    record = json.loads(path.read_text())
    record["indices"][0] += 1
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="recorded hash"):
        read_index_record(path, "cifar10", len(labels))


def _row(threat: str, attack: str, eps: float, accuracy: float, defense: str = "d") -> Row:
    correct = torch.zeros(100)
    correct[: round(accuracy * 100)] = 1
    return Row(
        defense=defense,
        threat=threat,
        attack=attack,
        norm="linf",
        eps=eps,
        eps_label=f"{eps:g}",
        steps=10,
        restarts=1,
        eot=1,
        n=100,
        accuracy=accuracy,
        accuracy_std=0.0,
        draws=1,
        seconds=1.0,
        img_per_s=100.0,
        seed=0,
        correct=correct,
        correct_every_draw=correct,
        examples=torch.zeros(0),
    )


def test_sanity_checks_flag_gradient_masking():
    honest = [_row("white-box", "fgsm", 4, 0.3), _row("white-box", "pgd10", 4, 0.1), _row("white-box", "pgd10", 8, 0.0)]
    assert sanity_warnings(honest, [], {}) == []
    one_step = sanity_warnings([_row("white-box", "fgsm", 4, 0.05), _row("white-box", "pgd10", 4, 0.2)], [], {})
    assert any("FGSM" in warning for warning in one_step)
    rising = sanity_warnings([_row("white-box", "pgd10", 4, 0.1), _row("white-box", "pgd10", 8, 0.4)], [], {})
    assert any("rises" in warning for warning in rising)
    gray = sanity_warnings([_row("gray-box", "pgd10", 4, 0.1), _row("bpda", "pgd10", 4, 0.5)], [], {})
    assert any("too weak" in warning for warning in gray)
    stuck = sanity_warnings([], [_row("none", "pgd20", 32, 0.3, defense="none")], {"d / white-box": 0.9})
    assert len(stuck) == 2


def _drawn_row(threat: str, attack: str, per_draw: list[list[int]], defense: str = "d") -> Row:
    """A row of a randomized defense from its (draws, n) correctness."""
    draws = torch.tensor(per_draw, dtype=torch.float32)
    row = _row(threat, attack, 0 if attack == "clean" else 8, draws.mean().item(), defense)
    row.n, row.draws = draws.shape[1], draws.shape[0]
    row.correct, row.correct_every_draw = draws.mean(0), draws.amin(0)
    return row


def test_worst_case_counts_an_image_robust_only_against_every_attack():
    a, b = _row("bpda", "pgd10", 8, 0.5), _row("bpda", "apgd-ce", 8, 0.5)
    b.correct = 1 - a.correct  # each attack breaks the images the other leaves
    b.correct_every_draw = b.correct
    clean = _row("clean", "clean", 0, 0.9)
    [case] = worst_case([clean, a, b], "shapes", "victim")
    assert case["robust_acc"] == "0.00" and case["clean_acc"] == "90.00" and case["threat"] == "bpda"


def test_strict_worst_case_needs_every_draw_of_clean_and_of_every_attack():
    """4 images, 2 scoring draws. Image 0 survives everything; image 1 falls in one draw of the
    attack; image 2 in one clean draw only; image 3 in one draw of each."""
    clean = _drawn_row("clean", "clean", [[1, 1, 0, 1], [1, 1, 1, 0]])
    attack = _drawn_row("white-box", "pgd10", [[1, 0, 1, 0], [1, 1, 1, 1]])
    [case] = worst_case([clean, attack], "shapes", "victim")
    assert case["robust_acc"] == "25.00"  # image 0 alone
    assert case["robust_acc_mean_draws"] == "62.50"  # (1 + 0.5 + 0.5 + 0.5) / 4
    assert case["draws"] == 2 and case["clean_acc"] == "75.00"


# One case per RECIPES family at least (test_every_attack_family_has_a_case): a new attack lands with one.
ATTACK_CASES = [
    ("fgsm", "linf", 8 / 255, 0.3),
    ("bim10", "linf", 8 / 255, 0.05),
    ("pgd10", "linf", 8 / 255, 0.05),
    ("pgd5r2", "l2", 1.0, 0.1),
    ("pgd-margin10r2", "linf", 8 / 255, 0.05),
    ("mifgsm10", "linf", 8 / 255, 0.1),
    ("apgd-ce", "linf", 8 / 255, 0.05),
    ("apgd-dlr20", "linf", 8 / 255, 0.05),
    ("autoattack", "linf", 8 / 255, 0.05),
    ("square300", "linf", 8 / 255, 0.6),
    ("cw30", "l2", 1.0, 0.1),
    ("deepfool", "linf", 8 / 255, 0.1),
]


def test_every_attack_family_has_a_case():
    assert {parse_attack(name).family for name, *_ in ATTACK_CASES} == set(RECIPES)


@pytest.mark.parametrize("name, norm, eps, ceiling", ATTACK_CASES)
def test_every_attack_breaks_the_undefended_victim(shapes_victim: Path, name, norm, eps, ceiling):
    victim = load_classifier(shapes_victim)
    images, labels = render_shapes(50, seed=1)
    x = images.float() / 255
    _, recipe, steps, restarts = parse_attack(name)
    x_adv = recipe.build(AttackSettings(norm, eps, steps, restarts=restarts))(
        victim, x, labels, seeded_generator("cpu", 0)
    )
    budget = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert budget.max() <= eps + 1e-5 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        assert (victim(x_adv).argmax(1) == labels).float().mean() < ceiling


def test_attack_names_are_checked():
    assert parse_attack("pgd20")[0::2] == ("pgd", 20)
    assert parse_attack("apgd-ce")[0::2] == ("apgd-ce", 100)
    with pytest.raises(ValueError, match="unknown attack 'pgdx'"):
        parse_attack("pgdx")
    with pytest.raises(ValueError, match="fixed number of steps"):
        parse_attack("fgsm10")
    assert parse_attack("apgd-dlr50")[0::2] == ("apgd-dlr", 50)  # a family ending in r is not a restart count
    with pytest.raises(ValueError, match="takes no restarts"):
        parse_attack("bim10r3")


def test_restarts_run_from_the_name_to_the_attack_and_the_row(shapes_victim: Path):
    """`pgd5r3` runs PGD-5 three times (each a forward-backward per step), and the row says so."""
    classifier, calls = load_classifier(shapes_victim), []

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.requires_grad)
        return classifier(x)

    images, labels = render_shapes(8, seed=2)
    x = images.float() / 255
    for name, runs in (("pgd5", 1), ("pgd5r3", 3)):
        calls.clear()
        family, recipe, steps, restarts = parse_attack(name)
        recipe.build(AttackSettings("linf", 0.01, steps, restarts=restarts))(
            counting, x, labels, seeded_generator("cpu", 0)
        )
        assert sum(calls) == 5 * runs, name  # gradient evaluations; the restarts' bookkeeping forwards need none
    evaluator = Evaluator(classifier, x, labels, seed=0, batch_size=8, eval_draws=1, eot=1)
    row = evaluator.attack(make_defense("identity"), THREATS["none"], "pgd5r3", "linf", 0.01, "0.01")
    assert (row.steps, row.restarts) == (5, 3)


def test_gray_box_adversarials_are_computed_once_for_all_defenses(shapes_victim: Path):
    images, labels = render_shapes(30, seed=1)
    evaluator = Evaluator(
        load_classifier(shapes_victim), images.float() / 255, labels, seed=0, batch_size=16, eval_draws=1, eot=1
    )
    median, wavelet = make_defense("median"), make_defense("wavelet")

    def examples(defense, threat: str) -> torch.Tensor:
        return evaluator.attack(defense, THREATS[threat], "pgd5", "linf", 8 / 255, "8/255").examples

    assert torch.equal(
        examples(median, "gray-box"), examples(wavelet, "gray-box")
    )  # the attacker never sees the defense
    assert not torch.equal(examples(median, "white-box"), examples(wavelet, "white-box"))


def test_transfer_and_black_box_threat_models(shapes_victim: Path, tmp_path: Path):
    common = ["--defense", "median", "--attacks", "pgd5,square100", "--n", "30", "--eps", "8/255"]
    results = evaluate(
        shapes_victim, tmp_path / "a", *common, "--threats", "transfer,black-box", "--transfer-from", str(shapes_victim)
    )
    ran = {(row["threat"], row["attack"]) for row in results["rows"]}
    assert {("transfer", "pgd5"), ("black-box", "square100")} <= ran
    assert {(s["threat"], s["attack"]) for s in results["skipped"]} == {
        ("transfer", "square100"),
        ("black-box", "pgd5"),
    }
    without_source = evaluate(shapes_victim, tmp_path / "b", *common, "--threats", "transfer")
    assert any("--transfer-from" in s["reason"] for s in without_source["skipped"])


def test_a_lightning_checkpoint_is_a_classifier_too(shapes_victim: Path, tmp_path: Path):
    checkpoint = shapes_victim.parent.parent / "runs" / "victim_shapes" / "checkpoints" / "last.ckpt"
    common = ["--attacks", "fgsm", "--threats", "none", "--n", "50"]
    from_export = evaluate(shapes_victim, tmp_path / "a", *common)
    from_checkpoint = evaluate(checkpoint, tmp_path / "b", *common)
    assert [r["accuracy"] for r in from_export["rows"]] == [r["accuracy"] for r in from_checkpoint["rows"]]


def test_autoattack_runs_its_rand_version_with_eot_against_a_randomized_defense(shapes_victim: Path):
    images, labels = render_shapes(20, seed=1)
    evaluator = Evaluator(
        load_classifier(shapes_victim), images.float() / 255, labels, seed=0, batch_size=20, eval_draws=2, eot=2
    )
    row = evaluator.attack(
        make_defense("random_resize_pad"), THREATS["white-box"], "autoattack", "linf", 8 / 255, "8/255"
    )
    assert row.eot == 2 and row.draws == 2  # APGD-CE + APGD-DLR with EOT, scored over two draws
    assert row.accuracy < 0.2


def test_classes_in_turn_spreads_every_prefix_over_the_classes():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 4)  # sorted by class, as a subset's index list is
    order = classes_in_turn(labels, len(labels))
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 2, 0, 2, 0]
    assert labels[classes_in_turn(labels, 3)].tolist() == [0, 1, 2]


def test_sanity_attacks_gradient_checks_and_examples_see_every_class(shapes_victim: Path, monkeypatch):
    """On a class-sorted subset, `[:count]` was one or two classes (issue 15)."""
    images, labels = render_shapes(100, seed=2)
    order = labels.argsort(stable=True)
    x, y = images[order].float() / 255, labels[order]
    evaluator = Evaluator(load_classifier(shapes_victim), x, y, seed=0, batch_size=50, eval_draws=1, eot=1)
    assert len(set(y[evaluator.example_positions].tolist())) == EXAMPLES
    row = evaluator.clean(make_defense("bit_depth:bits=4"))
    assert torch.equal(row.examples, x[evaluator.example_positions])
    attacked = []
    monkeypatch.setattr(runner.Evaluator, "attack", lambda self, *args, **kwargs: attacked.append(self.labels.clone()))
    sanity_rows(evaluator, [], "linf", 10)
    assert sorted(attacked[0].tolist()) == list(range(10))
    seen = []
    monkeypatch.setattr(runner, "input_gradient", lambda model, images, labels: seen.append(labels) or images * 0)
    evaluator.zero_gradient_share(make_defense("identity"), THREATS["white-box"], limit=20)
    assert sorted(seen[0].tolist()) == sorted(list(range(10)) * 2)


class RecordedNoise(Defense):
    """A randomized defense that adds small noise and records each draw, with who drew it."""

    randomized = True

    def __init__(self) -> None:
        super().__init__()
        self.phase = "attack"
        self.draws: dict[str, list[Tensor]] = {"attack": [], "score": []}

    def spec(self) -> dict:
        return {"name": "recorded_noise"}

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator(x.device), device=x.device) * 0.01
        self.draws[self.phase].append(noise)
        return (x + noise).clamp(0, 1)


def test_scoring_draws_are_fresh(shapes_victim: Path, monkeypatch):
    """A randomized defense is scored on draws the attacker never saw, and each scoring draw is new."""
    images, labels = render_shapes(20, seed=4)
    evaluator = Evaluator(
        load_classifier(shapes_victim), images.float() / 255, labels, seed=0, batch_size=10, eval_draws=3, eot=2
    )
    defense = RecordedNoise()
    score = Evaluator._score

    def scoring(self, *args):
        defense.phase = "score"
        return score(self, *args)

    monkeypatch.setattr(runner.Evaluator, "_score", scoring)
    evaluator.attack(defense, THREATS["white-box"], "pgd2", "linf", 4 / 255, "4/255")
    seen = {tuple(noise.flatten()[:16].tolist()) for noise in defense.draws["attack"]}
    scored = [tuple(noise.flatten()[:16].tolist()) for noise in defense.draws["score"]]
    assert len(scored) == 2 * 3 and defense.draws["attack"]  # 2 batches x 3 scoring draws
    assert not seen & set(scored), "a scoring draw repeats a draw the attack used"
    assert len(set(scored)) == len(scored), "scoring draws repeat each other"


def test_networks_run_channels_last_bf16_and_compiled_as_asked_and_compute_the_same(shapes_victim: Path, tmp_path):
    """evaluation.cli.load_models: the classifier and a restorer defense's network in channels_last,
    under bf16 autocast with fp32 outputs for --precision bf16, compiled for --compile; channels_last
    alone changes nothing but the layout."""
    export = atomic_save(restorer_class("sr")(classifier=str(shapes_victim)).to_export({}), tmp_path / "sr.pt")
    x = render_shapes(64, seed=5)[0].float() / 255

    def load(precision: str) -> tuple[nn.Module, Defense]:
        arguments = argparse.Namespace(
            classifier=str(shapes_victim),
            transfer_from=None,
            defense=[str(export)],
            precision=precision,
            compile=False,
            data="shapes",
        )
        classifier, _, (defense,) = evaluator_cli.load_models(arguments, torch.device("cpu"), x, len(SHAPE_CLASSES))
        return classifier, defense

    reference = load_classifier(shapes_victim)
    classifier, defense = load("32")
    convolution = next(parameter for parameter in classifier.parameters() if parameter.ndim == 4)
    assert convolution.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), reference(x), atol=1e-4, rtol=1e-4)
        plain_restored = defense(x)
        classifier, defense = load("bf16")
        assert isinstance(classifier, runner.AutocastModel) and isinstance(defense.network, runner.AutocastModel)
        assert classifier(x).dtype == torch.float32 and defense(x).dtype == torch.float32
        assert (classifier(x).argmax(1) == reference(x).argmax(1)).float().mean() >= 0.95
        assert (defense(x) - plain_restored).abs().max() < 0.05
    # Compiling is lazy and costs tens of seconds on the CPU: the gpu tier runs compiled evaluations.
    compiled = evaluator_cli.for_speed(load_classifier(shapes_victim), torch.device("cpu"), "bf16", True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled._orig_mod, runner.AutocastModel)


RESUMABLE = [
    "--data",
    "shapes",
    "--defense",
    "median:kernel=3",
    "bit_depth:bits=4",
    "--attacks",
    "pgd20",
    "--threats",
    "none,gray-box,white-box,bpda",
    "--n",
    "200",
    "--batch-size",
    "50",
    "--journal-batch-seconds",
    "0",
    "--sanity-images",
    "20",
    "--no-progress",
]


def test_a_killed_evaluation_resumes_to_the_results_of_an_uninterrupted_one(shapes_victim: Path, tmp_path: Path):
    """eval.py killed (SIGKILL) in the middle of a row, after some rows, then the same command with
    --resume: the rows and the batches of the unfinished row it had kept are read back, the rest
    computed, and every figure equals an uninterrupted run's."""
    out = tmp_path / "killed"
    command = [sys.executable, "eval.py", "--classifier", str(shapes_victim), *RESUMABLE, "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300

    def kept(folder: Path) -> int:
        return len(list(folder.glob("*.pt")))

    def unfinished_batches() -> int:  # a kill just after a row was kept can leave that row's batches
        folders = (out / "rows" / "batches").glob("*/")
        return sum(kept(folder) for folder in folders if not (out / "rows" / f"{folder.name}.pt").exists())

    # The first batch of a row after the fourth is kept; three more remain (each PGD-20 on 50 images).
    while (kept(out / "rows") < 4 or not unfinished_batches()) and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "eval.py finished before it could be killed"
    finished, batches = kept(out / "rows"), unfinished_batches()
    assert not (out / "results.json").exists() and batches >= 1

    resumed = evaluate(shapes_victim, out, *RESUMABLE, "--resume")
    straight = evaluate(shapes_victim, tmp_path / "straight", *RESUMABLE)
    assert resumed["meta"]["rows_read_back"] == finished >= 4
    assert resumed["meta"]["batches_read_back"] == batches and not list((out / "rows" / "batches").rglob("*.pt"))
    figures = ("defense", "threat", "attack", "eps_label", "accuracy", "accuracy_std", "n")
    for section in (lambda r: r["rows"], lambda r: r["sanity"]["large_eps_rows"]):
        assert [[row[key] for key in figures] for row in section(resumed)] == [
            [row[key] for key in figures] for row in section(straight)
        ]
    assert resumed["worst_case"] == straight["worst_case"]


def test_a_batch_is_kept_only_when_it_took_long_and_reads_back_bit_equal(tmp_path: Path):
    x_adv = torch.rand(4, 3, 8, 8)
    every, long_only = BatchJournal(tmp_path / "every", 0.0), BatchJournal(tmp_path / "long", 60.0)
    for journal in (every, long_only):
        journal.row = "r1"
        assert torch.equal(journal.batch(7, 3, lambda: x_adv)[0], x_adv)
    assert not list(tmp_path.glob("long/r1/*.pt")) and len(list(tmp_path.glob("every/r1/*.pt"))) == 1
    again, seconds = every.batch(7, 3, lambda: pytest.fail("a kept batch was attacked again"))
    assert torch.equal(again, x_adv) and every.loaded == 1 and seconds >= 0
    every.clear("r1")
    assert not list(tmp_path.glob("every/**/*.pt"))


def test_batches_a_kill_left_behind_a_kept_row_are_removed_not_read_back(tmp_path: Path):
    """A kill between keeping a row and removing its batches leaves them behind (what failed the
    kill-and-resume test once); the resume reads that row back and removes them, and reads back the
    batches of the row it had not finished, only those."""
    x_adv = torch.rand(4, 3, 8, 8)

    def attacked(journal: RowJournal, batches: int) -> Row:
        for index in range(batches):
            journal.batches.batch(7, index, lambda: x_adv)
        return _row("white-box", "pgd20", 8 / 255, 0.5)

    def killed(journal: RowJournal) -> Row:
        attacked(journal, 1)
        raise KeyboardInterrupt

    journal = RowJournal(tmp_path, {"n": 4}, resume=False, batch_seconds=0.0)
    journal.row(("kept",), lambda: attacked(journal, 2))
    journal.batches.clear = lambda row: None  # the kill lands after the next row is kept
    journal.row(("kept, batches left",), lambda: attacked(journal, 3))
    with pytest.raises(KeyboardInterrupt):
        journal.row(("unfinished",), lambda: killed(journal))

    resumed = RowJournal(tmp_path, {"n": 4}, resume=True, batch_seconds=0.0)
    for key in (("kept",), ("kept, batches left",)):
        resumed.row(key, lambda: pytest.fail("a kept row was computed again"))
    assert resumed.loaded == 2 and resumed.batches.loaded == 0
    assert len(list((tmp_path / "batches").rglob("*.pt"))) == 1  # the unfinished row's
    resumed.row(("unfinished",), lambda: attacked(resumed, 3))
    assert resumed.batches.loaded == 1 and not list((tmp_path / "batches").rglob("*.pt"))


def test_resume_refuses_the_rows_of_another_evaluation(shapes_victim: Path, tmp_path: Path):
    small = ["--defense", "bit_depth:bits=4", "--attacks", "fgsm", "--threats", "none,gray-box", "--sanity-images", "0"]
    evaluate(shapes_victim, tmp_path / "run", *small, "--n", "40")
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    with pytest.raises(SystemExit, match=r"another evaluation \(index_hash: .*; n: 40 then, 20 now\)"):
        evaluate(shapes_victim, tmp_path / "run", *small, "--n", "20", "--resume")
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == before
    with pytest.raises(SystemExit, match="nothing to resume"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("not an evaluation")
        evaluate(shapes_victim, tmp_path / "other", *small, "--n", "40", "--resume")


def test_a_resumed_run_moves_its_progress_bar_past_the_rows_it_reads_back(
    shapes_victim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Every row of the first run is read back by --resume; its bar still ends at its total (4 rows of
    one 40-image batch: clean x2, FGSM gray-box, FGSM threat none)."""
    small = ["--defense", "bit_depth:bits=4", "--attacks", "fgsm", "--threats", "none,gray-box", "--n", "40"]
    evaluate(shapes_victim, tmp_path / "run", *small, "--sanity-images", "0")
    capsys.readouterr()
    argv = ["--classifier", str(shapes_victim), "--data", "shapes", "--out", str(tmp_path / "run"), *small]
    resumed = evaluator_cli.main([*argv, "--sanity-images", "0", "--resume"])
    assert resumed["meta"]["rows_read_back"] == 4
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/4" in bar, bar


def write_folder_tree(root: Path, classes: int, per_class: int = 4) -> Path:
    """root/{train,test}/<class>/<i>.png: 32x32 RGB shapes images, `classes` classes."""
    images, _ = render_shapes(classes * per_class * 2, seed=3)
    for index, image in enumerate(images):
        split, label = ("train", "test")[index % 2], index // 2 % classes
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize(
    "case",
    ["classes", "channels", "defense_typo", "wrong_kind", "unreadable_image", "missing_classifier"],
)
def test_bad_input_is_one_clear_error_and_leaves_no_results_folder(case: str, shapes_victim: Path, tmp_path: Path):
    """Each bad input to eval.py ends in one line saying what is wrong and what to do (no traceback),
    before anything is written: the results folder does not exist afterwards."""
    data, expected = ["--data", "shapes"], ""
    defenses = ["--defense", "identity"]
    classifier = str(shapes_victim)
    if case == "classes":
        data = ["--data", "folder", "--data-root", str(write_folder_tree(tmp_path / "tree", classes=3))]
        expected = (
            r"does not fit the images of --data folder: it was built for 10 classes, the data has 3; pass a classifier"
        )
    elif case == "channels":
        write_data_set("fashion_mnist", tmp_path / "fmnist", train=20, test=20)
        data = ["--data", "fashion_mnist", "--data-root", str(tmp_path / "fmnist")]
        expected = r"fashion_mnist: it was built for 3 channels, the images have 1"
    elif case == "defense_typo":
        defenses, expected = ["--defense", "jpg:quality=75"], r"unknown defense 'jpg'; known: \[.*'jpeg'"
    elif case == "wrong_kind":
        defenses, expected = (
            ["--defense", str(shapes_victim)],
            "exports a classifier, not a defense; pass it as --classifier",
        )
    elif case == "unreadable_image":
        tree = write_folder_tree(tmp_path / "tree", classes=10)
        broken = tree / "test" / "class3" / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n but cut off here")
        data = ["--data", "folder", "--data-root", str(tree)]
        expected = r"'.*broken.png' is not a readable image \(.*\); replace or remove it"
    elif case == "missing_classifier":
        classifier, expected = str(tmp_path / "victim.pt"), r"'.*victim.pt' does not exist"
    out = tmp_path / "results"
    with pytest.raises(SystemExit, match=f"^error: .*{expected}"):
        evaluator_cli.main(["--classifier", classifier, *data, *defenses, "--n", "10", "--out", str(out)])
    assert not out.exists()
