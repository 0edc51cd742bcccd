from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attacks import input_gradient
from classifiers import load_classifier
from datamodules import render_shapes
from defenses import DefendedClassifier, make_defense
from engine.cli import RestorationCLI
from evaluation import cli as evaluator_cli
from restorers import RainDefense
from restorers.export import module_from_checkpoint
from tests.conftest import REPO_ROOT, restorer_args

RAIN_CONFIG = str(REPO_ROOT / "configs" / "rain_shapes.yaml")
STEPS = 100


@pytest.fixture(scope="module")
def rain_run(shapes_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RestorationCLI]:
    """100 steps of the tiny RAIN config, restoration loss only, against the quick-start victim."""
    root = tmp_path_factory.mktemp("rain")
    cli = RestorationCLI(
        args=restorer_args(
            RAIN_CONFIG,
            shapes_victim,
            root,
            "rain",
            STEPS,
            "--model.init_args.classifier_weight",
            "0.0",
            "--model.init_args.adversarial_share",
            "0.0",
        )
    )
    return root, cli


@pytest.fixture(scope="module")
def shapes_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = render_shapes(40, seed=5)
    return images.float() / 255, labels


def test_a_short_run_beats_srd_alone_psnr(rain_run):
    """The detail generator restores what SRd + bicubic lost, on the held-out validation images."""
    _, cli = rain_run
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == STEPS
    assert metrics["val/psnr"] > metrics["val/psnr_input"] + 0.5, (
        float(metrics["val/psnr"]),
        float(metrics["val/psnr_input"]),
    )
    assert metrics["val/ssim"] > metrics["val/ssim_input"]


def test_training_pairs_are_seeded_by_step_and_aligned_with_the_shift(rain_run, shapes_batch):
    _, cli = rain_run
    x, y = shapes_batch
    inputs, target = cli.model.make_pair(x, y, 5)
    again, _ = cli.model.make_pair(x, y, 5)
    other, _ = cli.model.make_pair(x, y, 6)
    assert inputs.shape == x.shape and torch.equal(inputs, again) and not torch.equal(inputs, other)
    # The target is each clean image under SRd's own shift (|dy|, |dx| <= max_shift = 2), so DG never guesses it.
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for image, shifted in zip(x, target):
        assert any(torch.equal(torch.roll(image, shift, dims=(1, 2)), shifted) for shift in shifts)
    assert not torch.equal(target, x)


def test_the_export_and_the_checkpoint_rebuild_the_trained_defense(rain_run, shapes_batch):
    root, cli = rain_run
    export = torch.load(root / "exports" / "rain.pt", weights_only=True)
    assert export["kind"] == "rain" and export["model"]["defense"] == {
        "min_size": 16,
        "max_size": 28,
        "max_shift": 2,
        "mode": "bilinear",
    }
    x = shapes_batch[0][:6]
    trained = cli.model.defense()
    exported = make_defense(str(root / "exports" / "rain.pt"))
    from_checkpoint = module_from_checkpoint(root / "runs" / "rain" / "checkpoints" / "last.ckpt").defense()
    assert isinstance(exported, RainDefense) and exported.randomized and exported.spec()["name"] == "rain"
    with torch.no_grad():
        outputs = []
        for defense in (trained, exported, from_checkpoint):
            defense.reseed(3)
            outputs.append([defense(x) for _ in range(3)])  # three successive draws
    assert all(out.shape == x.shape and 0 <= out.min() and out.max() <= 1 for out in outputs[0])
    assert not torch.equal(outputs[0][0], outputs[0][1])
    for rebuilt in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(rebuilt, outputs[0]))


def test_eot_averages_the_gradient_over_the_defenses_draws(rain_run, shapes_victim: Path, shapes_batch):
    _, cli = rain_run
    x, y = shapes_batch[0][:16], shapes_batch[1][:16]
    defense = cli.model.defense()
    model = DefendedClassifier(load_classifier(shapes_victim), defense)
    defense.reseed(7)
    averaged = input_gradient(model, x, y, eot=4)
    defense.reseed(7)
    singles = [input_gradient(model, x, y) for _ in range(4)]
    assert not torch.allclose(singles[0], singles[1])  # each draw has its own gradient
    assert torch.allclose(averaged, torch.stack(singles).mean(0), atol=1e-6)


def test_eval_attacks_rain_through_the_defense_with_eot(rain_run, shapes_victim: Path, tmp_path: Path):
    root, _ = rain_run
    results = evaluator_cli.main(
        [
            "--classifier",
            str(shapes_victim),
            "--data",
            "shapes",
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
            "--defense",
            str(root / "exports" / "rain.pt"),
            "--attacks",
            "pgd5",
            "--threats",
            "none,gray-box,white-box",
            "--n",
            "50",
            "--eot",
            "2",
            "--eval-draws",
            "2",
        ]
    )
    rows = {(row["threat"], row["attack"]): row for row in results["rows"] if row["defense"].startswith("rain(")}
    white_box = rows[("white-box", "pgd5")]
    assert white_box["eot"] == 2 and white_box["draws"] == 2 and rows[("gray-box", "pgd5")]["eot"] == 1
    assert white_box["accuracy"] <= rows[("gray-box", "pgd5")]["accuracy"]
