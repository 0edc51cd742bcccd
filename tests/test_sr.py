from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from attacks import input_gradient
from classifiers import load_classifier
from datamodules import render_shapes
from defenses import make_defense
from engine.cli import RestorationCLI
from engine.export import NotAnExportError
from evaluation import cli as evaluator_cli
from evaluation.threats import THREATS, attacked_model
from restorers.edsr import build_edsr
from restorers.export import module_from_checkpoint
from tests.conftest import QUIET, REPO_ROOT, SMALL_VALIDATION, TWO_CPU_PROCESSES, run_dirs, run_script

SR_CONFIG = str(REPO_ROOT / "configs" / "sr_shapes.yaml")
TRAIN_IMAGES, BATCH = 1024, 32
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
VAL_IMAGES = 200
# 200 steps. Validation's gray-box PGD at 4/255, not the config's 8/255: at 8/255 both restorers keep
# under 6% of the 200 validation shapes, too near the floor to tell them apart.
FEW_HUNDRED_STEPS = ["--data.init_args.num_train", str(6400 + VAL_IMAGES), "--model.init_args.val_eps", str(4 / 255)]


def sr_args(victim: Path, *extra: str) -> list[str]:
    """The quick start's SR config shrunk to seconds, against the session's quick-start victim."""
    return [
        "--config",
        SR_CONFIG,
        *QUIET,
        "--model.init_args.classifier",
        str(victim),
        "--data.init_args.num_train",
        str(TRAIN_IMAGES + VAL_IMAGES),
        "--data.init_args.num_test",
        "500",
        "--data.init_args.val_images",
        str(VAL_IMAGES),
        "--data.init_args.batch_size",
        str(BATCH),
        "--trainer.max_epochs",
        "1",
        *extra,
    ]


def fit_sr(tmp_path: Path, name: str, victim: Path, *extra: str) -> RestorationCLI:
    return RestorationCLI(args=["fit", *sr_args(victim, *run_dirs(tmp_path, name), *extra)])


@pytest.fixture(scope="module")
def sr_run(shapes_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RestorationCLI, dict]:
    """200 steps of the quick-start SR restorer, restoration loss only; the classifier's weights before."""
    root = tmp_path_factory.mktemp("sr")
    before = {k: v.clone() for k, v in torch.load(shapes_victim, weights_only=True)["state_dict"].items()}
    cli = fit_sr(root, "sr", shapes_victim, *FEW_HUNDRED_STEPS, "--model.init_args.classifier_weight", "0.0")
    return root, cli, before


def test_edsr_baseline_has_the_papers_size():
    assert sum(p.numel() for p in build_edsr("baseline", 2, 3).parameters()) == 1_369_859
    for scale in (2, 3, 4):
        assert build_edsr("baseline", scale, 3, num_blocks=1)(torch.rand(1, 3, 8, 8)).shape == (
            1,
            3,
            8 * scale,
            8 * scale,
        )


def test_a_short_run_beats_bicubic_psnr(sr_run):
    _, cli, _ = sr_run
    assert cli.trainer.global_step == 200
    metrics = cli.trainer.callback_metrics
    assert metrics["val/psnr"] > metrics["val/psnr_input"] + 0.5, (
        float(metrics["val/psnr"]),
        float(metrics["val/psnr_input"]),
    )
    assert metrics["val/ssim"] > metrics["val/ssim_input"]


def test_the_classifier_in_the_loop_buys_gray_box_accuracy(sr_run, shapes_victim: Path, tmp_path: Path):
    """The same 200 steps with the classifier's loss on the restored images: the defense keeps
    more images under gray-box PGD at 4/255 (the price is PSNR, see docs/RESULTS.md)."""
    _, pixel_only, _ = sr_run
    in_the_loop = fit_sr(
        tmp_path, "cls", shapes_victim, *FEW_HUNDRED_STEPS, "--model.init_args.classifier_weight", "0.01"
    )
    gray_box = [float(cli.trainer.callback_metrics["val/graybox_acc"]) for cli in (pixel_only, in_the_loop)]
    assert gray_box[1] > gray_box[0] + 0.05, gray_box


def test_eval_attacks_white_box_through_the_sr_restorer(sr_run, shapes_victim: Path, tmp_path: Path):
    """eval.py differentiates through the exported SR restorer (wavelet denoising, EDSR, resize):
    its white-box attacker has the exact gradient of restorer + classifier (not BPDA's identity
    stand-in), and a white-box PGD takes the defense to near 0% (docs/RESULTS.md: 0.0-0.2% on 500
    shapes) with no zero-gradient warning."""
    root, _, _ = sr_run
    export = str(root / "exports" / "sr.pt")
    victim, (images, labels) = load_classifier(shapes_victim), render_shapes(16, seed=1)
    x, defense = images.float() / 255, make_defense(export, victim)
    white_box = input_gradient(attacked_model(THREATS["white-box"], victim, defense, None), x, labels)
    bpda = input_gradient(attacked_model(THREATS["bpda"], victim, defense, None), x, labels)
    assert torch.allclose(white_box, input_gradient(lambda inputs: victim(defense(inputs)), x, labels), atol=1e-6)
    assert (white_box - bpda).abs().sum() > 0.01 * white_box.abs().sum()
    results = evaluator_cli.main(
        ["--classifier", str(shapes_victim), "--data", "shapes", "--out", str(tmp_path / "eval"), "--no-progress"]
        + ["--defense", export, "--attacks", "pgd10", "--threats", "white-box", "--n", "50", "--sanity-images", "0"]
    )
    rows = {row["threat"]: row for row in results["rows"] if row["defense"] != "none"}
    assert rows["clean"]["accuracy"] > 0.8 and rows["white-box"]["accuracy"] <= 0.06
    assert not [warning for warning in results["warnings"] if "gradient" in warning]


def test_the_classifier_stays_frozen_and_out_of_the_optimizer(sr_run):
    _, cli, before = sr_run
    module = cli.model
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(not p.requires_grad and id(p) not in optimized for p in module.classifier.parameters())
    assert not module.classifier.training
    after = module.classifier.net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_export_rebuilds_the_trained_defense(sr_run):
    root, cli, _ = sr_run
    export = torch.load(root / "exports" / "sr.pt", weights_only=True)
    assert export["kind"] == "sr" and not any(k.startswith("classifier") for k in export["state_dict"])
    assert export["model"]["victim"]["sha256"] and export["model"]["training"]["adversarial_share"] == 0.25
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = cli.model.defense()(x)
        assert torch.equal(make_defense(str(root / "exports" / "sr.pt"))(x), trained)
        from_checkpoint = module_from_checkpoint(root / "runs" / "sr" / "checkpoints" / "last.ckpt").defense()
        assert torch.equal(from_checkpoint(x), trained)  # the checkpoint's EMA weights are the exported ones


def test_the_restorer_export_command_and_its_guards(sr_run, tmp_path: Path, shapes_victim: Path):
    root, _, _ = sr_run
    checkpoint = root / "runs" / "sr" / "checkpoints" / "last.ckpt"
    out = tmp_path / "sr.pt"
    assert run_script("-m", "restorers.export", str(checkpoint), str(out)).returncode == 0
    again = run_script("-m", "restorers.export", str(checkpoint), str(out))
    assert again.returncode != 0 and "--overwrite" in again.stderr
    victim_checkpoint = shapes_victim.parent.parent / "runs" / "victim_shapes" / "checkpoints" / "last.ckpt"
    with pytest.raises(NotAnExportError, match="not a checkpoint of a restorer"):
        module_from_checkpoint(victim_checkpoint)


class _StopAfterFirstEpoch(pl.Callback):
    """An interruption at the first epoch boundary, without a kill."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def test_resume_continues_the_restorer_and_its_average(shapes_victim: Path, tmp_path: Path):
    steps_per_epoch = 8  # equality needs no learning: 8 steps an epoch, 2 small validation batches
    two_epochs = ["--trainer.max_epochs", "2", *SMALL_VALIDATION]
    two_epochs += ["--data.init_args.num_train", str(steps_per_epoch * BATCH + VAL_IMAGES)]

    class InterruptedCLI(RestorationCLI):
        def before_fit(self) -> None:
            super().before_fit()
            self.trainer.callbacks.append(_StopAfterFirstEpoch())

    InterruptedCLI(args=["fit", *sr_args(shapes_victim, *run_dirs(tmp_path, "run"), *two_epochs)])
    resumed = fit_sr(tmp_path, "run", shapes_victim, *two_epochs, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 2 * steps_per_epoch
    straight = fit_sr(tmp_path, "straight", shapes_victim, *two_epochs)
    for name, weight in straight.model.restorer.state_dict().items():  # EMA weights after on_train_end
        assert torch.equal(resumed.model.restorer.state_dict()[name], weight), name


def test_bf16_mixed_precision_trains_the_restorer_on_cpu(shapes_victim: Path, tmp_path: Path):
    """The step, validation and export under bf16 autocast: 3 steps and 2 validation batches of 16 (CPUs
    without AVX-512 emulate bf16, slowly)."""
    precision = ["--trainer.precision", "bf16-mixed", "--trainer.limit_train_batches", "3", *SMALL_VALIDATION]
    cli = fit_sr(tmp_path, "bf16", shapes_victim, *precision)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3 and math.isfinite(float(metrics["train/loss"]))
    assert math.isfinite(float(metrics["val/psnr"])) and (tmp_path / "exports" / "bf16.pt").is_file()


def test_ddp_with_two_cpu_processes_trains_the_restorer(shapes_victim: Path, tmp_path: Path):
    result = run_script(
        "train.py",
        "fit",
        *sr_args(shapes_victim, *run_dirs(tmp_path, "ddp")),
        *TWO_CPU_PROCESSES,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = torch.load(tmp_path / "exports" / "ddp.pt", weights_only=True)["meta"]
    assert meta["world_size"] == 2 and meta["global_step"] == STEPS_PER_EPOCH // 2
    assert math.isfinite(meta["metrics"]["val/psnr"])
