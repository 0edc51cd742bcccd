from __future__ import annotations

import math
import os
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from classifiers import load_classifier
from classifiers.factory import build_classifier
from datamodules.shapes import render_shapes
from engine.cli import RestorationCLI
from engine.export import atomic_save, make_export
from tests.conftest import QUICKSTART_CONFIG, QUIET, REPO_ROOT, SMALL_RUN, TWO_CPU_PROCESSES, fit, run_dirs, run_script

TRAIN_IMAGES, BATCH = 3000, 32  # SMALL_RUN's training set and batch size


def export_of(tmp_path: Path, name: str) -> dict:
    return torch.load(tmp_path / "exports" / f"{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short quick-start run (2 epochs), shared by the tests that only read its files."""
    root = tmp_path_factory.mktemp("trained")
    fit(root, "victim", "--trainer.max_epochs", "2")
    return root


def test_quickstart_victim_learns_the_embedded_set(shapes_victim: Path):
    accuracy = torch.load(shapes_victim, weights_only=True)["meta"]["metrics"]["val/acc"]
    assert accuracy >= 0.9, f"small CNN reached only {accuracy:.3f} on the embedded shapes"


def test_bf16_mixed_precision_trains_on_cpu(tmp_path: Path):
    cli = fit(tmp_path, "bf16", "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "3")
    assert cli.trainer.precision == "bf16-mixed"
    assert export_of(tmp_path, "bf16")["meta"]["metrics"]["val/acc"] > 0.2  # chance is 0.1


class _Recorder(pl.Callback):
    """Records where training starts and stops training after `stop_after` epochs."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.start = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        momentum = trainer.optimizers[0].state_dict()["state"]
        self.start = (
            trainer.current_epoch,
            trainer.global_step,
            {k: v["momentum_buffer"].clone() for k, v in momentum.items()},
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_after is not None and trainer.current_epoch + 1 == self.stop_after:
            trainer.should_stop = True  # an interruption at an epoch boundary, without a kill


def fit_recorded(tmp_path: Path, name: str, recorder: _Recorder, *extra: str) -> RestorationCLI:
    class RecordingCLI(RestorationCLI):
        def before_fit(self) -> None:
            super().before_fit()
            self.trainer.callbacks.append(recorder)

    return RecordingCLI(args=["fit", "--config", QUICKSTART_CONFIG, *SMALL_RUN, *run_dirs(tmp_path, name), *extra])


def test_resume_continues_from_the_last_checkpoint_exactly(tmp_path: Path):
    steps_per_epoch = 20  # equality needs no learning: 640 training images an epoch (SMALL_RUN holds 500 out)
    four_epochs = ["--trainer.max_epochs", "4", "--data.init_args.num_train", str(steps_per_epoch * BATCH + 500)]
    four_epochs += ["--model.init_args.schedule", "onecycle"]  # its scheduler state must resume too
    fit_recorded(tmp_path, "run", _Recorder(stop_after=2), *four_epochs)
    last = torch.load(tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 2 * steps_per_epoch)

    resumed = _Recorder()
    cli = fit_recorded(tmp_path, "run", resumed, *four_epochs, "--ckpt_path", "last")
    epoch, step, momentum = resumed.start
    assert (epoch, step) == (2, 2 * steps_per_epoch)
    saved = last["optimizer_states"][0]["state"]
    assert momentum and all(torch.equal(momentum[k], saved[k]["momentum_buffer"]) for k in momentum)
    assert cli.trainer.global_step == 4 * steps_per_epoch

    uninterrupted = fit(tmp_path, "straight", *four_epochs)
    for (name, resumed_weight), straight_weight in zip(
        cli.model.state_dict().items(), uninterrupted.model.state_dict().values()
    ):
        assert torch.equal(resumed_weight, straight_weight), f"{name} differs after resume"


def test_a_fresh_fit_never_overwrites_an_existing_run(trained_run: Path):
    with pytest.raises(SystemExit, match="^error: run 'victim' already has checkpoints .*--ckpt_path last"):
        fit(trained_run, "victim", "--trainer.max_epochs", "1")


def test_test_subcommand_evaluates_the_last_checkpoint(trained_run: Path):
    cli = RestorationCLI(
        args=[
            "test",
            "--config",
            QUICKSTART_CONFIG,
            *SMALL_RUN,
            *run_dirs(trained_run, "victim"),
            "--ckpt_path",
            "last",
        ]
    )
    assert cli.trainer.callback_metrics["test/acc"] > 0.2  # chance is 0.1


def test_checkpoint_export_command_and_its_overwrite_guard(trained_run: Path, tmp_path: Path):
    checkpoint = trained_run / "runs" / "victim" / "checkpoints" / "last.ckpt"
    out = tmp_path / "victim.pt"
    first = run_script("-m", "classifiers.export", str(checkpoint), str(out))
    assert first.returncode == 0, first.stderr
    again = run_script("-m", "classifiers.export", str(checkpoint), str(out))
    assert again.returncode != 0 and "--overwrite" in again.stderr
    x = torch.rand(4, 3, 32, 32)
    from_fit_end = load_classifier(trained_run / "exports" / "victim.pt")
    assert torch.equal(load_classifier(out)(x), from_fit_end(x))
    assert torch.equal(load_classifier(checkpoint)(x), from_fit_end(x))


def test_ddp_with_two_cpu_processes_trains(tmp_path: Path):
    result = run_script(
        "train.py",
        "fit",
        "--config",
        QUICKSTART_CONFIG,
        *SMALL_RUN,
        *run_dirs(tmp_path, "ddp"),
        *TWO_CPU_PROCESSES,
        "--trainer.max_epochs",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = export_of(tmp_path, "ddp")["meta"]
    assert meta["world_size"] == 2
    # Each rank sees half of the images: half the optimizer steps of a single process.
    assert meta["global_step"] == 3 * math.ceil(TRAIN_IMAGES / 2 / BATCH)
    assert meta["metrics"]["val/acc"] > 0.2  # chance is 0.1


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_config_parses(config: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as printed:
        RestorationCLI(args=["fit", "--config", str(REPO_ROOT / "configs" / config), "--print_config"])
    assert printed.value.code == 0
    assert "inference_mode: false" in capsys.readouterr().out  # attacks need gradients in validate/test


def test_the_cifar10_gpu_config_runs_on_cpu_at_tiny_scale(cifar_tree: Path, tmp_path: Path):
    cli = RestorationCLI(
        args=[
            "fit",
            "--config",
            str(REPO_ROOT / "configs" / "victim_cifar10.yaml"),
            *run_dirs(tmp_path, "cifar"),
            *QUIET,
            "--data.init_args.root",
            str(cifar_tree),
            "--model.init_args.arch_kwargs",
            "{width: 8}",
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--data.init_args.on_device",
            "false",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
            "--data.init_args.val_images",
            "200",
        ]
    )
    stem = cli.model.classifier.net.stem.weight
    assert stem.is_contiguous(memory_format=torch.channels_last)  # the ChannelsLast callback ran
    assert cli.trainer.global_step == 3 and (tmp_path / "exports" / "cifar.pt").is_file()


def _dispatch(filename: str) -> bool:
    """torch's function-mode dispatch and the device audit's mode (tests/device_audit.py): not a caller."""
    return filename.endswith(("device_audit.py", f"torch{os.sep}overrides.py", f"utils{os.sep}_device.py"))


class HostReads(pl.Callback):
    """Records, from the start of training batch 1 to the end of batch 2's step, every read of a tensor's
    value by the host (`.item()`, `.tolist()`, `bool()`, `float()`, `int()`): on a GPU each one waits for
    the queue to drain. torch.optim's reads are left out: it keeps its step counts on the CPU."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.originals = {name: getattr(torch.Tensor, name) for name in self.NAMES}

    def _recording(self, name: str):
        original, reads = self.originals[name], self.reads

        def read(tensor: torch.Tensor, *args, **kwargs):
            frames = [frame for frame in traceback.extract_stack()[:-1] if not _dispatch(frame.filename)]
            caller = frames[-1]
            nested = caller.name == "read" and caller.filename == __file__  # the audit's mode calls the read again
            if not nested and f"torch{os.sep}optim{os.sep}" not in caller.filename:
                reads.append(f"{name} at {caller.filename}:{caller.lineno}")
            return original(tensor, *args, **kwargs)

        return read

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            for name in self.NAMES:
                setattr(torch.Tensor, name, self._recording(name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 2:
            self.restore()

    def restore(self) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("config", ["victim_shapes", "sr_shapes", "robust_shapes"])
def test_a_training_step_reads_nothing_back_to_the_host(config: str, shapes_victim: Path, tmp_path: Path):
    """Lightning read every progress-bar value back with .item() after each step; the steps now log to
    TensorBoard only (issue 18). On a GPU the gpu tier checks this with CUDA's sync debug mode."""
    recorder = HostReads()

    class RecordingCLI(RestorationCLI):
        def before_fit(self) -> None:
            super().before_fit()
            self.trainer.callbacks.append(recorder)

    victim = [] if config.startswith("victim") else ["--model.init_args.classifier", str(shapes_victim)]
    small = ["--data.init_args.num_train", "400", "--data.init_args.val_images", "100"]
    small += ["--data.init_args.batch_size", "8"]
    limits = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1"]
    try:
        RecordingCLI(
            args=["fit", "--config", str(REPO_ROOT / "configs" / f"{config}.yaml"), *QUIET, *small, *limits, *victim]
            + [*run_dirs(tmp_path, config), "--trainer.num_sanity_val_steps", "0"]
        )
    finally:
        recorder.restore()
    assert recorder.reads == [], recorder.reads


def classifier_file(path: Path, arch: str = "small_cnn", classes: int = 10, channels: int = 3, **arch_kwargs) -> Path:
    """An untrained classifier's export file: enough for the checks that read its spec or run it once."""
    spec = {"arch": arch, "num_classes": classes, "in_chans": channels, "arch_kwargs": arch_kwargs}
    spec |= {"mean": None, "std": None}
    net = build_classifier(arch, classes, channels, **arch_kwargs)
    return atomic_save(make_export("classifier", spec, net.state_dict(), {}), path)


def broken_image_tree(root: Path) -> Path:
    """root/{train,test}/<class>/<i>.png (10 classes of shapes), one of the training files cut off."""
    images, labels = render_shapes(40, seed=5)
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        folder = root / ("train", "test")[index % 2] / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index}.png")
    (root / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but cut off here")
    return root


@pytest.mark.parametrize(
    "case", ["classes", "channels", "image_size", "wrong_kind", "missing_classifier", "unreadable_image"]
)
def test_bad_input_to_train_is_one_clear_error_and_writes_nothing(case: str, tmp_path: Path):
    """Each bad input to `train.py fit` ends in one `error:` line saying what is wrong and what to do
    (no traceback), before anything of the run is written: no run folder, no export."""
    config, data = str(REPO_ROOT / "configs" / "sr_shapes.yaml"), []
    victim = tmp_path / "victim.pt"
    if case == "classes":
        classifier_file(victim, classes=5)
        expected = r"victim.pt' does not fit the data: it was built for 5 classes, the data has 10; train the"
    elif case == "channels":
        classifier_file(victim, channels=1)
        expected = r"it was built for 1 channels, the images have 3"
    elif case == "image_size":  # a ViT made for 32 px images; the shapes drawn at 48 px
        vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
        classifier_file(victim, "timm/vit_tiny_patch16_224", **vit)
        data = ["--data.init_args.image_size", "48"]
        expected = r"does not fit the data: it fails on \(3, 48, 48\) .*images: .*48.*32"
    elif case == "wrong_kind":
        atomic_save(make_export("sr", {}, {}, {}), victim)
        expected = r"victim.pt' exports a sr, not a classifier"
    elif case == "missing_classifier":
        expected = r"export file '.*victim.pt' does not exist"
    elif case == "unreadable_image":
        config = QUICKSTART_CONFIG
        tree = broken_image_tree(tmp_path / "tree")
        data = ["--data", "datamodules.ImageFolderTensors", "--data.init_args.root", str(tree)]
        data += ["--data.init_args.val_images", "4", "--data.init_args.cache_decoded", "false"]
        expected = r"'.*broken.png' is not a readable image \(.*\); replace or remove it"
    args = ["fit", "--config", config, *QUIET, *run_dirs(tmp_path, "run"), *data]
    if config != QUICKSTART_CONFIG:
        args += ["--model.init_args.classifier", str(victim)]
    with pytest.raises(SystemExit, match=f"^error: .*{expected}"):
        RestorationCLI(args=args)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "exports").exists()
