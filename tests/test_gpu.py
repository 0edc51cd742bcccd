"""The `gpu` tier: what only a GPU shows. `pytest -m gpu` on one GPU (issue 13).

- every config in configs/ fits 3 steps on the device in its own precision with its data resident
  there, writes its export, and the export loads back (a victim as the classifier, a restorer as
  its defense in eval.py);
- every defense spec and every restorer kind through every threat model that applies, on a few
  images (EOT, BPDA, transfer, black-box), and the library attacks (pyautoattack, foolbox) on CUDA;
- certify.py (randomized smoothing's counts, CERTIFY and the empirical check) on the device in bf16;
- the device regressions: JPEG the same on the device, the CAM head under bf16 autocast, CII's training step in bf16;
- resume of a restorer run on the device; 16-mixed beside the configs' bf16-mixed, and the
  training attack no weaker under fp16 autocast than in fp32.

Data: the real CIFAR-10 (100 JPEGs per class and split of ../shared/data's tree, or
.data/cifar10-jpg.tar.gz where ../shared does not travel); SVHN, Fashion-MNIST and STL10 written in
their own formats (tests/data_files.py); the embedded shapes. Without CUDA the tier is skipped;
RD_GPU_TIER_ON_CPU=1 runs it on the CPU with small batches, a dry run of its logic only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml

from attacks import pgd, seeded_generator
from classifiers import load_classifier
from defenses import Jpeg, make_defense
from defenses.cam import locate_cam_layers
from engine.cli import RestorationCLI
from evaluation import certification as certify_cli
from evaluation import cli as evaluator_cli
from evaluation.journal import BatchJournal
from tests.conftest import QUIET, REPO_ROOT, gpu_tier_device, run_dirs, run_script, torch_flags_kept
from tests.data_files import accept_written_files, cifar_subset_tree, shapes_split, write_data_set
from tests.device_audit import audit_paused

pytestmark = pytest.mark.gpu

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
STEPS = 3
# data.class_path -> eval.py's --data name
DATA_NAMES = {
    "datamodules.Shapes": "shapes",
    "datamodules.CIFAR10": "cifar10",
    "datamodules.SVHN": "svhn",
    "datamodules.FashionMNIST": "fashion_mnist",
    "datamodules.STL10": "stl10",
}


def config_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def data_class(path: Path) -> str:
    return config_of(path)["data"]["class_path"]


def validation_images(device: torch.device) -> int:
    """The tier's validation split: one batch, held out of the training images it writes."""
    return 40 if device.type == "cpu" else 200


def train_images(data: str, device: torch.device) -> int:
    """Training images the tier writes for `data`: STEPS full batches of its largest config batch, and
    the validation split held out of them."""
    largest_batch = max(
        config_of(path)["data"]["init_args"]["batch_size"] for path in CONFIGS if data_class(path) == data
    )
    return STEPS * largest_batch + validation_images(device)


def is_victim(path: Path) -> bool:
    return config_of(path)["model"]["class_path"] == "classifiers.VictimModule"


class DeviceRecorder(pl.Callback):
    """Where the first training batch, the module and (for restorers) the frozen classifier live."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.seen:
            classifier = pl_module.classifier
            self.seen = {
                "batch": batch[0].device.type,
                "dtype": batch[0].dtype,
                "module": pl_module.device.type,
                "classifier_buffers": {buffer.device.type for buffer in classifier.buffers()},
                "loss_finite": bool(torch.isfinite(outputs["loss"]).item()),
            }


class Tier:
    """Fits each config once per session (victims before the restorers that need them) and keeps the exports."""

    def __init__(self, root: Path, device: torch.device, data_roots: dict[str, Path]) -> None:
        self.root = root
        self.device = device
        self.data_roots = data_roots
        self.exports: dict[str, Path] = {}
        self.recorded: dict[str, dict[str, Any]] = {}

    def data_args(self, data: str) -> list[str]:
        # One validation batch. Not `--trainer.limit_val_batches 1`: the command line hands Lightning the
        # float 1.0 for it, which means 100% of the batches.
        one_batch = str(validation_images(self.device))
        args = [
            "--data.init_args.on_device",
            "true",
            "--data.init_args.val_images",
            one_batch,
            "--data.init_args.eval_batch_size",
            one_batch,
        ]
        if data == "datamodules.Shapes":
            num_train = 1024 + validation_images(self.device)
            args += ["--data.init_args.num_train", str(num_train), "--data.init_args.num_test", "1000"]
        else:
            args += ["--data.init_args.root", str(self.data_roots[data])]
        if (
            self.device.type == "cpu"
        ):  # the dry run: GPU batches, and bf16 (emulated on most CPUs), would take minutes per step
            args += ["--data.init_args.batch_size", "16", "--trainer.precision", "32-true"]
        return args

    def precision(self, config: Path) -> str:
        """The precision a fit of `config` runs in: the config's own on a GPU, fp32 in the CPU dry run."""
        return str(config_of(config)["trainer"]["precision"]) if self.device.type == "cuda" else "32-true"

    def victim_for(self, data: str) -> Path:
        (victim,) = [path for path in CONFIGS if is_victim(path) and data_class(path) == data]
        return self.export(victim)

    def fit(
        self, config: Path, name: str, *extra: str, steps: int = STEPS, callbacks: tuple[pl.Callback, ...] = ()
    ) -> RestorationCLI:
        """`train.py fit` of the config on the tier's device for `steps` steps (per epoch) and one validation
        batch, with `callbacks` beside the config's."""
        recorder = DeviceRecorder()

        class RecordingCLI(RestorationCLI):
            def before_fit(self) -> None:
                super().before_fit()
                self.trainer.callbacks.extend([recorder, *callbacks])

        victim = [] if is_victim(config) else ["--model.init_args.classifier", str(self.victim_for(data_class(config)))]
        victim += self.start_args(config)
        with torch_flags_kept():  # a later evaluation in this test must not inherit `deterministic: true`
            cli = RecordingCLI(
                args=[
                    "fit",
                    "--config",
                    str(config),
                    *QUIET,
                    *run_dirs(self.root, name),
                    "--trainer.accelerator",
                    self.device.type,
                    "--trainer.devices",
                    "1",
                    "--trainer.max_epochs",
                    "1",
                    "--trainer.limit_train_batches",
                    str(steps),
                    "--trainer.num_sanity_val_steps",
                    "0",
                    *self.data_args(data_class(config)),
                    *victim,
                    *extra,
                ]
            )
        self.recorded[name] = recorder.seen
        return cli

    def start_args(self, config: Path) -> list[str]:
        """A stage-2 config (init_from: checkpoints/<stage 1>.pt) starts from this tier's export of stage 1."""
        start = config_of(config)["model"].get("init_args", {}).get("init_from")
        return (
            []
            if start is None
            else ["--model.init_args.init_from", str(self.export(config.parent / f"{Path(start).stem}.yaml"))]
        )

    def export(self, config: Path) -> Path:
        if config.stem not in self.exports:
            self.fit(config, config.stem)
            self.exports[config.stem] = self.root / "exports" / f"{config.stem}.pt"
        return self.exports[config.stem]


@pytest.fixture(scope="module")
def tier(cifar_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    device = gpu_tier_device()
    assert device is not None, "conftest skips the gpu tier where it has no device"
    data = tmp_path_factory.mktemp("tier_data")
    per_class = -(-train_images("datamodules.CIFAR10", device) // 10)
    roots = {"datamodules.CIFAR10": cifar_subset_tree(cifar_tree, data / "cifar10", per_class, 100)}
    for name, class_path in (
        ("svhn", "datamodules.SVHN"),
        ("fashion_mnist", "datamodules.FashionMNIST"),
        ("stl10", "datamodules.STL10"),
    ):
        write_data_set(name, data / name, train=train_images(class_path, device), test=1000)
        roots[class_path] = data / name
    with accept_written_files():
        yield Tier(tmp_path_factory.mktemp("tier_runs"), device, roots)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_config_fits_on_the_device_and_its_export_loads(tier: Tier, config: Path):
    export = tier.export(config)
    seen = tier.recorded[config.stem]
    device = tier.device.type
    assert seen["batch"] == seen["module"] == device and seen["dtype"] == torch.float32, seen
    assert seen["loss_finite"], f"{config.stem}: non-finite training loss"
    payload = torch.load(export, weights_only=True)
    assert payload["meta"]["global_step"] == STEPS
    assert payload["meta"]["precision"] == tier.precision(config)
    data = data_class(config)
    classifier = load_classifier(tier.victim_for(data)).to(tier.device)
    channels, size = (1, 28) if data == "datamodules.FashionMNIST" else (3, 96 if data == "datamodules.STL10" else 32)
    x = shapes_split(4, 9, size, channels)[0].to(tier.device).float() / 255
    if is_victim(config):
        assert load_classifier(export).to(tier.device)(x).shape == (4, 10)
        return
    assert seen["classifier_buffers"] == {device}, "the frozen classifier did not follow the module to the device"
    defense = make_defense(str(export), classifier).to(tier.device).eval()
    restored = defense(x)
    assert restored.shape == x.shape and restored.device.type == device and 0 <= restored.min() <= restored.max() <= 1


# Every defense by spec (the shapes evaluation) beside the restorers trained on each data set.
BASELINES = [
    "identity",
    "jpeg:quality=75",
    "bit_depth:bits=4",
    "median:kernel=3",
    "bicubic:factor=2",
    "wavelet",
    "random_resize_pad:max_pad=4",
    "srd",
    "cii",
    "dip:iterations=40,record_every=10,warmup_records=1",
    "smoothing:sigma=0.25,draws=50",
]


@pytest.mark.parametrize("data", sorted(DATA_NAMES), ids=[DATA_NAMES[key] for key in sorted(DATA_NAMES)])
def test_every_defense_runs_through_every_threat_model_on_the_device(tier: Tier, data: str, tmp_path: Path):
    victim = tier.victim_for(data)
    restorers = [str(tier.export(path)) for path in CONFIGS if not is_victim(path) and data_class(path) == data]
    specs = (
        BASELINES
        if data == "datamodules.Shapes"
        else ["wavelet:ycbcr=False" if data == "datamodules.FashionMNIST" else "wavelet"]
    )
    root = [] if data == "datamodules.Shapes" else ["--data-root", str(tier.data_roots[data])]
    results = evaluator_cli.main(
        [
            "--classifier",
            str(victim),
            "--data",
            DATA_NAMES[data],
            *root,
            "--defense",
            *specs,
            *restorers,
            "--attacks",
            "fgsm,pgd3",
            "--threats",
            "none,gray-box,white-box,bpda,transfer",
            "--transfer-from",
            str(victim),
            "--n",
            "20",
            "--batch-size",
            "10",
            "--eot",
            "2",
            "--eval-draws",
            "2",
            "--sanity-images",
            "10",
            "--device",
            tier.device.type,
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
        ]
    )
    if tier.device.type == "cuda":
        assert results["meta"]["device"] == torch.cuda.get_device_name()
    defenses = {row["defense"] for row in results["rows"]} - {"none"}
    assert len(defenses) == len(specs) + len(restorers)
    for skipped in results["skipped"]:
        assert skipped["threat"] == "white-box" and "not differentiable" in skipped["reason"], skipped
    for defense in defenses:
        threats = {row["threat"] for row in results["rows"] if row["defense"] == defense}
        assert {"clean", "gray-box", "bpda", "transfer"} <= threats, (defense, threats)
    randomized = [row for row in results["rows"] if row["draws"] == 2 and row["threat"] in ("white-box", "bpda")]
    assert all(row["eot"] == 2 for row in randomized)


def test_certify_runs_on_the_device_in_bf16_and_no_certified_image_flips(tier: Tier, tmp_path: Path):
    """certify.py with its counts on the device and the classifier under bf16 autocast: the denoiser of
    the shapes config and the victim alone, with the empirical check (SmoothAdv on the device)."""
    denoiser = tier.export(REPO_ROOT / "configs" / "denoiser_shapes_stability.yaml")
    results = certify_cli.main(
        [
            "--classifier",
            str(tier.victim_for("datamodules.Shapes")),
            "--defense",
            str(denoiser),
            "smoothing:sigma=0.25",
            "--n",
            "20",
            "--selection-draws",
            "20",
            "--estimation-draws",
            "500",
            "--batch",
            "2000",
            "--check-radii",
            "0.05",
            "--check-steps",
            "3",
            "--check-prediction-draws",
            "500",
            "--precision",
            "bf16" if tier.device.type == "cuda" else "32",
            "--device",
            tier.device.type,
            "--out",
            str(tmp_path / "certify"),
            "--no-progress",
        ]
    )
    if tier.device.type == "cuda":
        assert results["meta"]["device"] == torch.cuda.get_device_name()
    for summary in results["defenses"]:
        curve = [accuracy for _, accuracy in summary["curve"]]
        assert curve == sorted(curve, reverse=True) and 0 <= curve[0] <= 1
        assert all(row["flipped"] == 0 for row in summary["empirical_check"]), summary["empirical_check"]


def test_library_attacks_run_on_the_device(tier: Tier, tmp_path: Path):
    """pyautoattack (APGD, AutoAttack standard and rand, Square) and foolbox (C&W, DeepFool) on the device."""
    pytest.importorskip(
        "pyautoattack", reason="pyautoattack is not installed here (a 42 MB wheel; carry it to run this)"
    )
    pytest.importorskip(
        "foolbox", reason="foolbox is not installed here (carry it with eagerpy, GitPython, gitdb, smmap)"
    )
    victim, shapes = (
        tier.victim_for("datamodules.Shapes"),
        ["--data", "shapes", "--n", "10", "--batch-size", "10", "--no-progress"],
    )
    common = [
        "--classifier",
        str(victim),
        *shapes,
        "--device",
        tier.device.type,
        "--eot",
        "2",
        "--eval-draws",
        "2",
        "--sanity-images",
        "0",
    ]
    linf = evaluator_cli.main(
        [
            *common,
            "--defense",
            "wavelet",
            "srd",
            "--attacks",
            "apgd-ce5,apgd-dlr5,autoattack,square50",
            "--threats",
            "none,white-box,black-box",
            "--out",
            str(tmp_path / "linf"),
        ]
    )
    attacked = {(row["defense"], row["attack"]) for row in linf["rows"]}
    assert {("wavelet(wavelet=db1,ycbcr=True)", "autoattack"), ("none", "square50")} <= attacked, attacked
    l2 = evaluator_cli.main(
        [
            *common,
            "--norm",
            "l2",
            "--eps",
            "0.5",
            "--defense",
            "wavelet",
            "--attacks",
            "cw5,deepfool3",
            "--threats",
            "none,white-box",
            "--out",
            str(tmp_path / "l2"),
        ]
    )
    assert {row["attack"] for row in l2["rows"]} == {"clean", "cw5", "deepfool3"}


def test_jpeg_is_the_same_function_on_the_device_as_on_the_cpu(tier: Tier):
    """On an H200, nvJPEG's round trip differed from libjpeg's by 6.4/255 per pixel: a JPEG defense
    must not depend on the device it runs on."""
    x = shapes_split(16, 3, 32, 3)[0].float() / 255
    on_device = Jpeg(75)(x.to(tier.device))
    assert on_device.device.type == tier.device.type
    # The same pixels: nvJPEG was 6.4/255 off on average; 1e-6 is far below one level (1/255).
    assert (on_device.cpu() - Jpeg(75)(x)).abs().max() < 1e-6


def cifar_victim(tier: Tier) -> Path:
    return tier.victim_for("datamodules.CIFAR10")


def test_cii_finds_the_cam_head_and_trains_in_bf16_on_the_device(tier: Tier):
    """On an H100 in bf16-mixed, CIIDefence took the ResNet-18's pooling head for something else and
    Grad-CAM then failed on the frozen classifier ("element 0 of tensors does not require grad")."""
    classifier = load_classifier(cifar_victim(tier)).to(tier.device)
    x = shapes_split(8, 4, 32, 3)[0].to(tier.device).float() / 255
    with torch.autocast(tier.device.type, dtype=torch.bfloat16):
        assert locate_cam_layers(classifier, x[:1]).head is not None
    result = run_script(
        "benchmarks/restorer_step.py",
        "--config",
        "configs/cii_cifar10.yaml",
        "--batch",
        "32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--model.init_args.classifier",
        str(cifar_victim(tier)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["precision"] == "bf16-mixed" and line["train_img_per_s"] > 0


class StartState(pl.Callback):
    """The optimizer state and the EMA average as training (re)starts, and where they live."""

    def __init__(self, stop_after_epoch: int | None = None) -> None:
        self.stop_after_epoch = stop_after_epoch
        self.state = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0].state_dict()["state"]
        ema = next(callback for callback in trainer.callbacks if type(callback).__name__ == "RestorerEMA")
        self.state = {
            "global_step": trainer.global_step,
            "exp_avg": {key: value["exp_avg"].detach().clone() for key, value in optimizer.items()},
            "ema": {key: value.detach().clone() for key, value in (ema.average or {}).items()},
        }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_after_epoch is not None and trainer.current_epoch + 1 == self.stop_after_epoch:
            trainer.should_stop = True


def test_a_restorer_run_resumes_on_the_device(tier: Tier):
    config = REPO_ROOT / "configs" / "sr_cifar10.yaml"
    two_epochs = ["--trainer.max_epochs", "2"]

    def fit(callback: StartState, *extra: str) -> None:
        class ResumingCLI(RestorationCLI):
            def before_fit(self) -> None:
                super().before_fit()
                self.trainer.callbacks.append(callback)

        victim = ["--model.init_args.classifier", str(cifar_victim(tier))]
        ResumingCLI(
            args=[
                "fit",
                "--config",
                str(config),
                *QUIET,
                *run_dirs(tier.root, "resume"),
                "--trainer.accelerator",
                tier.device.type,
                "--trainer.limit_train_batches",
                str(STEPS),
                "--trainer.num_sanity_val_steps",
                "0",
                *tier.data_args("datamodules.CIFAR10"),
                *victim,
                *two_epochs,
                *extra,
            ]
        )

    fit(StartState(stop_after_epoch=1))
    saved = torch.load(
        tier.root / "runs" / "resume" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    resumed = StartState()
    fit(resumed, "--ckpt_path", "last")
    state = resumed.state
    assert state["global_step"] == saved["global_step"] == STEPS
    saved_moments = saved["optimizer_states"][0]["state"]
    for key, moment in state["exp_avg"].items():
        assert moment.device.type == tier.device.type and torch.equal(moment.cpu(), saved_moments[key]["exp_avg"])
    ema = next(value for key, value in saved["callbacks"].items() if key.startswith("RestorerEMA"))["average"]
    for key, average in state["ema"].items():
        assert average.device.type == tier.device.type and torch.equal(average.cpu(), ema[key])


FP16_CONFIGS = ["victim_cifar10", "sr_cifar10", "trn_cifar10", "cii_cifar10"]


@pytest.mark.parametrize("name", FP16_CONFIGS)
def test_16_mixed_fits_beside_bf16(tier: Tier, name: str):
    if tier.device.type != "cuda":
        pytest.skip("16-mixed needs CUDA: Lightning runs bf16 in its place on the CPU")
    tier.fit(REPO_ROOT / "configs" / f"{name}.yaml", f"{name}_fp16", "--trainer.precision", "16-mixed")
    export = torch.load(tier.root / "exports" / f"{name}_fp16.pt", weights_only=True)
    assert export["meta"]["precision"] == "16-mixed" and export["meta"]["global_step"] == STEPS
    assert tier.recorded[f"{name}_fp16"]["loss_finite"]
    assert all(torch.isfinite(value).all() for value in export["state_dict"].values() if value.is_floating_point())


def test_the_training_attack_is_no_weaker_under_fp16_autocast(tier: Tier):
    """fp16 without a scaler can underflow input gradients (field notes); the attack must not weaken."""
    quick_start = [
        "--data.init_args.num_train",
        "20000",
        "--data.init_args.batch_size",
        "128",
        "--trainer.max_epochs",
        "3",
    ]
    tier.fit(REPO_ROOT / "configs" / "victim_shapes.yaml", "trained_shapes", *quick_start, steps=10**6)  # whole epochs
    classifier = load_classifier(tier.root / "exports" / "trained_shapes.pt").to(tier.device)
    x, y = shapes_split(500, 11, 32, 3)
    x, y = x.to(tier.device).float() / 255, y.to(tier.device)
    with torch.no_grad():
        assert (classifier(x).argmax(1) == y).float().mean() > 0.9, "the quick-start victim did not learn"
    accuracy = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with torch.autocast(tier.device.type, dtype=dtype, enabled=dtype != torch.float32):
            adversarial = pgd(4 / 255, steps=5)(classifier, x, y, seeded_generator(tier.device, 0))
        with torch.no_grad():
            accuracy[dtype] = (classifier(adversarial).argmax(1) == y).float().mean().item()
    assert accuracy[torch.float16] <= accuracy[torch.float32] + 0.02, accuracy
    assert accuracy[torch.bfloat16] <= accuracy[torch.float32] + 0.02, accuracy


def test_compiled_evaluation_is_no_weaker_on_the_device(tier: Tier, tmp_path: Path):
    """eval.py --compile (torch.compile of the classifier and the restorer's network) against the same
    command without it: the same clean accuracies, attacks no weaker (issue 18: faster, never weaker)."""
    robust = tier.export(REPO_ROOT / "configs" / "robust_shapes.yaml")
    command = [
        "--classifier",
        str(tier.victim_for("datamodules.Shapes")),
        "--defense",
        str(robust),
        "--attacks",
        "pgd10",
        "--threats",
        "none,white-box",
        "--n",
        "200",
        "--sanity-images",
        "0",
        "--precision",
        "bf16" if tier.device.type == "cuda" else "32",
        "--device",
        tier.device.type,
        "--no-progress",
    ]
    plain = evaluator_cli.main([*command, "--out", str(tmp_path / "plain")])
    with audit_paused():  # dynamo cannot trace through the audit's function mode
        compiled = evaluator_cli.main([*command, "--compile", "--out", str(tmp_path / "compiled")])
    assert compiled["meta"]["compile"] and not plain["meta"]["compile"]
    tolerance = 2 / 200  # bf16 kernels of another schedule may flip an image or two
    for ours, theirs in zip(compiled["rows"], plain["rows"], strict=True):
        assert (ours["defense"], ours["threat"]) == (theirs["defense"], theirs["threat"])
        if ours["attack"] == "clean":
            assert abs(ours["accuracy"] - theirs["accuracy"]) <= tolerance, (ours, theirs)
        else:
            assert ours["accuracy"] <= theirs["accuracy"] + tolerance, (ours, theirs)


ROW_KEYS = ("defense", "threat", "attack", "eps_label", "n")


class _Stopped(Exception):
    """Stands for the process dying (tests/test_eval.py kills eval.py for real, on the CPU)."""


def test_an_evaluation_stopped_inside_a_row_resumes_on_the_device(
    tier: Tier, shapes_victim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """eval.py's journal with the attack on the device (issue 19): a batch attacked there is kept on the
    host and read back onto the device; stopped inside a row and resumed, the figures are those of an
    uninterrupted run (within an image per row: the device's backward kernels need not be deterministic)."""
    command = [
        "--classifier",
        str(shapes_victim),  # trained (the tier's victims are not): a batch read back wrong shows in the figures
        "--defense",
        "median:kernel=3",
        "--attacks",
        "pgd10",
        "--threats",
        "none,gray-box,white-box",
        "--eps",
        "2/255",
        "--n",
        "200",
        "--batch-size",
        "50",
        "--journal-batch-seconds",
        "0",
        "--sanity-images",
        "0",
        "--device",
        tier.device.type,
        "--no-progress",
    ]
    attacked, calls = BatchJournal.batch, []

    def stops_at_the_sixth_batch(journal: BatchJournal, key: int, index: int, compute):
        calls.append(index)
        if len(calls) == 6:  # the first attacked row (4 batches of 50) kept, the second's first batch too
            raise _Stopped
        return attacked(journal, key, index, compute)

    monkeypatch.setattr(BatchJournal, "batch", stops_at_the_sixth_batch)
    with pytest.raises(_Stopped):
        evaluator_cli.main([*command, "--out", str(tmp_path / "stopped")])
    monkeypatch.undo()
    resumed = evaluator_cli.main([*command, "--resume", "--out", str(tmp_path / "stopped")])
    straight = evaluator_cli.main([*command, "--out", str(tmp_path / "straight")])
    assert resumed["meta"]["rows_read_back"] >= 2 and resumed["meta"]["batches_read_back"] == 1
    for ours, theirs in zip(resumed["rows"], straight["rows"], strict=True):
        assert [ours[key] for key in ROW_KEYS] == [theirs[key] for key in ROW_KEYS]
        assert abs(ours["accuracy"] - theirs["accuracy"]) <= 1 / 200 + 1e-9, (ours, theirs)


def test_a_restorer_fits_with_compiled_networks_on_the_device(tier: Tier):
    config = REPO_ROOT / "configs" / "sr_shapes.yaml"
    with audit_paused():  # dynamo cannot trace through the audit's function mode
        tier.fit(config, "sr_compiled", "--model.init_args.compile_networks", "true")
    export = torch.load(tier.root / "exports" / "sr_compiled.pt", weights_only=True)
    assert export["meta"]["global_step"] == STEPS and tier.recorded["sr_compiled"]["loss_finite"]
    assert not any("_orig_mod" in key for key in export["state_dict"])  # the keys of an uncompiled run
    make_defense(str(tier.root / "exports" / "sr_compiled.pt"))  # strict loading: raises on other keys


class NoHostSync(pl.Callback):
    """From the start of training batch 1 to the end of batch 2's step, CUDA's sync debug mode raises at
    the first host synchronization (`.item()`, a CPU copy, a data-dependent shape), with its traceback:
    one whole step and the logging after it, past batch 0's warm-up (cuDNN's choices, lazy parts)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if batch_idx == 2:
            torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        torch.cuda.set_sync_debug_mode("default")


# The CIFAR-10 victim and the stage-1 config of every restorer kind (a stage 2 trains the same module).
SYNC_CONFIGS = [
    "victim_cifar10",
    "sr_cifar10",
    "rain_cifar10",
    "trn_cifar10",
    "cii_cifar10",
    "robust_cifar10",
    "denoiser_cifar10",
]


@pytest.mark.parametrize("name", SYNC_CONFIGS)
def test_a_training_step_never_waits_for_the_device(tier: Tier, name: str):
    """No host synchronization in a training step under Lightning: the batch, the pair and its attack,
    the losses, backward, the optimizer, the callbacks and the step's logging. Each one stalls the
    GPU's queue until the step is done (issue 18: Lightning read a progress-bar loss back every step)."""
    if tier.device.type != "cuda":
        pytest.skip("host synchronizations exist on CUDA only")
    tier.fit(REPO_ROOT / "configs" / f"{name}.yaml", f"{name}_sync", callbacks=[NoHostSync()])
