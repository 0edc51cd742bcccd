"""Preemption: a `train.py fit` subprocess killed (SIGKILL) or stopped (SIGTERM) at a step, then resumed
with `--ckpt_path last`, ends with the weights of an uninterrupted run, bit for bit; damaged checkpoints
give one clear error, or a fallback to the newest intact one (issue 19)."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from engine.checkpointing import checkpoint_problem
from engine.cli import RestorationCLI
from tests.conftest import REPO_ROOT, run_script, torch_flags_kept

# The quick-start victim on 700 shapes: 19 steps per epoch, 2 epochs; last.ckpt every 3 steps.
STEPS_PER_EPOCH, EPOCHS = 19, 2
SMALL = [
    "--data.init_args.num_train",
    "700",
    "--data.init_args.val_images",
    "100",
    "--data.init_args.batch_size",
    "32",
    "--trainer.max_epochs",
    str(EPOCHS),
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--run.checkpoint_every_n_steps",
    "3",
]


def train(root: Path, name: str, *extra: str, config: str = "victim_shapes") -> tuple[int, str]:
    command = ["train.py", "fit", "--config", f"configs/{config}.yaml", *SMALL]
    command += ["--run.name", name, "--run.root", str(root / "runs"), "--run.export_dir", str(root / "exports")]
    done = run_script(*command, *extra)
    return done.returncode, done.stdout + done.stderr


def signal_at(step: int, name: str) -> list[str]:
    spec = {"class_path": "tests.interruptions.SignalAtStep", "init_args": {"step": step, "signal_name": name}}
    return [f"--trainer.callbacks+={json.dumps(spec)}"]


def weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(root / "exports" / f"{name}.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("straight")
    code, output = train(root, "straight")
    assert code == 0, output[-3000:]
    return weights(root, "straight")


def assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"weights differ from the uninterrupted run: {different}"


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(seed: int, uninterrupted, tmp_path: Path):
    step = random.Random(seed).randrange(4, EPOCHS * STEPS_PER_EPOCH - 1)  # a step after the first save
    code, output = train(tmp_path, "run", *signal_at(step, "SIGKILL"))
    assert code == -signal.SIGKILL, output[-3000:]
    saved = torch.load(tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert step - 3 <= saved["global_step"] < step  # the kill came before that step's checkpoint
    code, output = train(tmp_path, "run", "--ckpt_path", "last")
    assert code == 0, output[-3000:]
    assert_same_weights(weights(tmp_path, "run"), uninterrupted)


def test_a_restorer_killed_mid_epoch_resumes_to_the_same_weights(uninterrupted, tmp_path: Path):
    """The SR restorer: a PGD pair on a quarter of each batch (draws keyed by step) and the EMA of its
    weights (a callback's state), killed mid-way through its second epoch."""
    victim = next(Path(tmp_path).parent.glob("straight*/exports/straight.pt"))
    restorer = ["--model.init_args.classifier", str(victim)]
    code, output = train(tmp_path, "straight_sr", *restorer, config="sr_shapes")
    assert code == 0, output[-3000:]
    code, output = train(tmp_path, "run", *restorer, *signal_at(STEPS_PER_EPOCH + 8, "SIGKILL"), config="sr_shapes")
    assert code == -signal.SIGKILL, output[-3000:]
    code, output = train(tmp_path, "run", *restorer, "--ckpt_path", "last", config="sr_shapes")
    assert code == 0, output[-3000:]
    assert_same_weights(weights(tmp_path, "run"), weights(tmp_path, "straight_sr"))


def test_sigterm_saves_the_step_exits_cleanly_and_resumes_to_the_same_weights(uninterrupted, tmp_path: Path):
    step = STEPS_PER_EPOCH + 5  # mid-epoch, not a multiple of the 3-step checkpoints
    code, output = train(tmp_path, "run", *signal_at(step, "SIGTERM"))
    assert code == 0, output[-3000:]
    saved = torch.load(tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == step and "SIGTERM: saved" in output
    assert not (tmp_path / "exports" / "run.pt").exists()  # an interrupted fit writes no export
    code, output = train(tmp_path, "run", "--ckpt_path", "last")
    assert code == 0, output[-3000:]
    assert_same_weights(weights(tmp_path, "run"), uninterrupted)


@pytest.fixture
def finished_run(uninterrupted, tmp_path: Path) -> Path:
    """A copy of the uninterrupted run's folder: last.ckpt, previous.ckpt (kept when last.ckpt was
    rewritten) and the best checkpoint."""
    source = next(Path(path) for path in Path(tmp_path).parent.glob("straight*/runs/straight"))
    shutil.copytree(source, tmp_path / "runs" / "run")
    return tmp_path


def resume_in_process(root: Path) -> RestorationCLI:
    command = ["fit", "--config", str(REPO_ROOT / "configs" / "victim_shapes.yaml"), *SMALL, "--ckpt_path", "last"]
    command += ["--run.name", "run", "--run.root", str(root / "runs"), "--run.export_dir", str(root / "exports")]
    with torch_flags_kept():
        return RestorationCLI(args=command)


def damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a write cut off halfway


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one_saying_so(finished_run: Path):
    checkpoints = finished_run / "runs" / "run" / "checkpoints"
    assert (checkpoints / "previous.ckpt").is_file(), "last.ckpt's previous version was not kept"
    for path in [checkpoints / "last.ckpt", *checkpoints.glob("best-*.ckpt")]:  # only previous.ckpt intact
        damage(path)
    with pytest.warns(UserWarning, match=r"last.ckpt' is damaged \(.*\); resuming from .*previous.ckpt"):
        cli = resume_in_process(finished_run)
    assert cli.config_init.fit.ckpt_path == str(checkpoints / "previous.ckpt")


def test_no_intact_checkpoint_is_one_clear_error_naming_each_file(finished_run: Path):
    checkpoints = finished_run / "runs" / "run" / "checkpoints"
    for path in checkpoints.glob("*.ckpt"):
        damage(path)
    (checkpoints / "previous.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: cannot resume from .*last.ckpt'.*previous.ckpt: it is empty"):
        resume_in_process(finished_run)


def test_a_damaged_checkpoint_given_by_path_names_the_intact_one_to_use(finished_run: Path):
    """The advice names the newest intact checkpoint: one that reads back and is the furthest of those
    left (previous.ckpt or the best one, whichever the run's validation made last)."""
    checkpoints = finished_run / "runs" / "run" / "checkpoints"
    damage(checkpoints / "last.ckpt")
    expected = r"^error: cannot resume from .*last.ckpt': it is not a torch checkpoint.*beside it is '(.*\.ckpt)'"
    with pytest.raises(SystemExit, match=expected) as refused:
        RestorationCLI(
            args=["fit", "--config", str(REPO_ROOT / "configs" / "victim_shapes.yaml"), *SMALL]
            + ["--run.name", "run", "--run.root", str(finished_run / "runs"), "--run.export_dir", str(finished_run)]
            + ["--ckpt_path", str(checkpoints / "last.ckpt")]
        )
    named = Path(re.search(expected, str(refused.value)).group(1))
    assert named.parent == checkpoints and checkpoint_problem(named) is None

    def step(path: Path) -> int:
        return torch.load(path, weights_only=True)["global_step"]

    intact = [path for path in checkpoints.glob("*.ckpt") if checkpoint_problem(path) is None]
    assert step(named) == max(map(step, intact))
