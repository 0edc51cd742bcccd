from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attacks import input_gradient
from classifiers import load_classifier
from datamodules import render_shapes
from defenses import make_defense
from defenses.gradient_map import gradient_map
from engine.cli import RestorationCLI
from evaluation import cli as evaluator_cli
from evaluation.threats import THREATS, attacked_model
from restorers import TrnDefense, TrnRestorer
from tests.conftest import REPO_ROOT, SMALL_VALIDATION, TWO_CPU_PROCESSES, restorer_args, run_script

TRN_CONFIG = str(REPO_ROOT / "configs" / "trn_shapes.yaml")
EPS = 8 / 255


def trn_args(victim: Path, root: Path, name: str, steps: int, *extra: str) -> list[str]:
    """The tiny TRN config shrunk to `steps` steps of 32 images, against the quick-start victim."""
    return restorer_args(TRN_CONFIG, victim, root, name, steps, *extra)


@pytest.fixture(scope="module")
def victim(shapes_victim: Path) -> torch.nn.Module:
    return load_classifier(shapes_victim)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = render_shapes(64, seed=9)
    return images.float() / 255, labels


@pytest.fixture(scope="module")
def trn_run(shapes_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RestorationCLI]:
    root = tmp_path_factory.mktemp("trn")
    return root, RestorationCLI(args=trn_args(shapes_victim, root, "trn", 150))


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_the_gradient_map_is_autograds_input_gradient_at_the_predicted_label(victim, batch):
    x = batch[0][:16].clone().requires_grad_(True)
    logits = victim(x)
    F.cross_entropy(logits, logits.argmax(1).detach(), reduction="sum").backward()
    raw = gradient_map(victim, batch[0][:16], normalize=False)
    assert torch.allclose(raw, x.grad, rtol=1e-5, atol=1e-10)
    normalized = gradient_map(victim, batch[0][:16])
    assert torch.allclose(normalized.abs().flatten(1).amax(1), torch.ones(16))
    assert torch.allclose(normalized * raw.abs().flatten(1).amax(1).view(-1, 1, 1, 1), raw, atol=1e-8)
    assert torch.allclose(
        gradient_map(victim, batch[0][:16], "topk", top_k=1), normalized
    )  # top-1 weighted = predicted


def test_the_on_the_fly_attack_fools_the_frozen_classifier_within_budget(shapes_victim: Path, victim, batch):
    module = TrnRestorer(str(shapes_victim), adversarial_share=0.75, attack_eps=EPS, attack_steps=3)
    x, y = batch
    attacked = module.attack_mixture(x, y, step=0)
    assert torch.equal(attacked[48:], x[48:])  # the clean quarter
    assert (attacked - x).abs().max() <= EPS + 1e-6 and 0 <= attacked.min() and attacked.max() <= 1
    assert accuracy(victim, attacked[:48], y[:48]) < accuracy(victim, x[:48], y[:48]) - 0.5
    assert torch.equal(module.attack_mixture(x, y, step=0), attacked)  # seeded by the step
    assert not torch.equal(module.attack_mixture(x, y, step=1), attacked)


def test_the_attack_and_the_gradient_map_are_sound_under_bf16_autocast(shapes_victim: Path, victim, batch):
    module = TrnRestorer(str(shapes_victim), adversarial_share=1.0, attack_eps=EPS, attack_steps=3)
    x, y = batch
    fp32 = module.attack_mixture(x, y, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = module.attack_mixture(x, y, step=0)
        map_bf16 = gradient_map(victim, x)
    assert bf16.dtype == torch.float32 and accuracy(victim, bf16, y) <= accuracy(victim, fp32, y) + 0.05
    cosine = F.cosine_similarity(map_bf16.float().flatten(1), gradient_map(victim, x).flatten(1)).mean()
    assert cosine > 0.9, float(cosine)


def test_a_short_run_defends_adversarial_inputs(trn_run, victim, batch):
    """After 150 steps the defense classifies gray-box PGD adversarials far better than the victim alone."""
    _, cli = trn_run
    metrics = cli.trainer.callback_metrics
    x, y = batch
    x_adv = cli.model.validation_attack(x, y, 0)
    undefended, defended = accuracy(victim, x_adv, y), accuracy(lambda t: victim(cli.model.defense()(t)), x_adv, y)
    assert defended > undefended + 0.2, (defended, undefended)
    assert float(metrics["val/graybox_acc"]) > 0.2


def test_white_box_gradients_go_through_the_gradient_estimation(trn_run, victim, batch):
    """Double backprop: the exact input gradient differs from BPDA's (gradient stream held constant)
    by the part that flows through the estimated gradient map, and is not zero."""
    _, cli = trn_run
    defense = cli.model.defense()
    x, y = batch[0][:16], batch[1][:16]
    gradients = []
    for restore in (defense, defense.bpda):
        inputs = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(F.cross_entropy(victim(restore(inputs)), y, reduction="sum"), inputs)
        gradients.append(gradient)
    exact, bpda = gradients
    assert exact.abs().sum() > 0 and (exact - bpda).abs().sum() > 0.01 * exact.abs().sum()
    with torch.no_grad():
        assert torch.equal(defense(x), defense.bpda(x))  # the same forward pass


def test_the_export_rebuilds_the_defense_around_the_evaluated_classifier(trn_run, shapes_victim: Path, victim, batch):
    root, cli = trn_run
    path = str(root / "exports" / "trn.pt")
    with pytest.raises(ValueError, match="--classifier"):
        make_defense(path)
    rebuilt = make_defense(path, victim)
    assert isinstance(rebuilt, TrnDefense) and rebuilt.classifier is victim
    with torch.no_grad():
        assert torch.equal(rebuilt(batch[0]), cli.model.defense()(batch[0]))
        from_checkpoint = make_defense(str(root / "runs" / "trn" / "checkpoints" / "last.ckpt"), victim)
        assert torch.equal(from_checkpoint(batch[0]), rebuilt(batch[0]))


def test_evals_white_box_attacker_differentiates_through_the_gradient_map(trn_run, victim, batch):
    """The model eval.py's white-box attack follows has the exact input gradient (double backprop
    through the estimated gradient map), not BPDA's, which is what a cut path would give: then a
    white-box row would only repeat the BPDA row and still sit below gray-box."""
    _, cli = trn_run
    defense = cli.model.defense()
    x, y = batch[0][:16], batch[1][:16]
    white_box = input_gradient(attacked_model(THREATS["white-box"], victim, defense, None), x, y)
    bpda = input_gradient(attacked_model(THREATS["bpda"], victim, defense, None), x, y)
    exact = input_gradient(lambda inputs: victim(defense(inputs)), x, y)
    assert torch.allclose(white_box, exact, atol=1e-6)
    assert (white_box - bpda).abs().sum() > 0.01 * white_box.abs().sum()


def test_eval_runs_white_box_and_bpda_through_trn(trn_run, shapes_victim: Path, tmp_path: Path):
    """eval.py end to end; which gradient its white-box attack follows is the test above's."""
    root, _ = trn_run
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
            str(root / "exports" / "trn.pt"),
            "--attacks",
            "pgd5",
            "--threats",
            "gray-box,white-box,bpda",
            "--n",
            "50",
        ]
    )
    rows = {row["threat"]: row for row in results["rows"] if row["defense"].startswith("trn(")}
    assert {"gray-box", "white-box", "bpda"} <= set(rows)
    assert rows["white-box"]["accuracy"] <= rows["gray-box"]["accuracy"]


def test_bf16_mixed_precision_trains_trn_on_cpu(shapes_victim: Path, tmp_path: Path):
    """The step and validation under bf16 autocast: 3 steps and 2 validation batches of 16 (CPUs without
    AVX-512 emulate bf16, slowly)."""
    args = trn_args(shapes_victim, tmp_path, "bf16", 3, "--trainer.precision", "bf16-mixed", *SMALL_VALIDATION)
    cli = RestorationCLI(args=args)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3 and math.isfinite(float(metrics["train/loss"]))
    assert math.isfinite(float(metrics["val/psnr"]))


def test_ddp_with_two_cpu_processes_trains_trn(shapes_victim: Path, tmp_path: Path):
    """Each rank makes its own adversarial examples (seeded by rank) inside its step."""
    args = trn_args(
        shapes_victim,
        tmp_path,
        "ddp",
        20,
        *TWO_CPU_PROCESSES,
    )
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = torch.load(tmp_path / "exports" / "ddp.pt", weights_only=True)["meta"]
    assert meta["world_size"] == 2 and meta["global_step"] == 10 and math.isfinite(meta["metrics"]["val/psnr"])
