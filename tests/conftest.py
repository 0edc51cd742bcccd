from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from engine.cli import RestorationCLI
from tests.device_audit import implicit_device_audit

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the checkout; .data/ inside it (git-ignored) where ../shared does not travel (a GPU machine).
CIFAR_TARBALLS = (
    REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz",
    REPO_ROOT / ".data" / "cifar10-jpg.tar.gz",
)
QUICKSTART_CONFIG = str(REPO_ROOT / "configs" / "victim_shapes.yaml")
GPU_TIER_ON_CPU = "RD_GPU_TIER_ON_CPU"  # =1: run the gpu tier on the CPU (a dry run of its logic, not of any device)


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist (`pytest -n 2`, what .ci/run does) each worker gets its share of the cores,
    and so do the train.py / eval.py processes it starts (OMP_NUM_THREADS is inherited): two workers
    of two threads each on 2 cores spend their time waiting for each other. A test that compares a
    subprocess's figures with its own then also compares like with like."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_among_workers()


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that `make` fills once per test run, however many xdist workers ask for it: each
    worker is a process with its own session fixtures, so the first to ask makes it, under a file
    lock, where all workers' temporary folders live, and the others wait for it and read it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        root = tmp_path_factory.mktemp(name)
        make(root)
        return root
    root = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{root}.lock"):
        if not (root / ".complete").is_file():
            shutil.rmtree(root, ignore_errors=True)  # what a worker that failed making it left
            root.mkdir()
            make(root)
            (root / ".complete").touch()
    return root


def gpu_tier_device() -> torch.device | None:
    """The device the `gpu` tier runs on: CUDA when present, the CPU when asked for a dry run, else None."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if os.environ.get(GPU_TIER_ON_CPU) == "1" else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped, saying why, where there is no CUDA device (CI)."""
    if gpu_tier_device() is not None:
        return
    skip = pytest.mark.skip(
        reason="gpu tier: no CUDA device here "
        f"(run `pytest -m gpu` on a GPU; {GPU_TIER_ON_CPU}=1 dry-runs it on the CPU)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def tensors_say_where_they_live() -> Iterator[None]:
    """Every test is also a device audit (tests/device_audit.py): project code that creates a tensor
    without `device=` fails here, on the CPU, instead of on the first GPU it meets."""
    with implicit_device_audit():
        yield


@contextlib.contextmanager
def torch_flags_kept() -> Iterator[None]:
    """Undo the process-wide flags a Trainer sets: `deterministic: true` (victim_shapes.yaml) turns on
    torch.use_deterministic_algorithms for the whole process, and on CUDA every later bicubic
    backward or median in that process then raises (found by the gpu tier on an H200)."""
    deterministic, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@pytest.fixture(autouse=True)
def each_test_starts_with_torch_flags_unset() -> Iterator[None]:
    with torch_flags_kept():
        yield


QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# The quick-start config, shrunk to seconds: 3000 training images (500 more held out for
# validation) in batches of 32 at a constant learning rate. The shapes have a start-up plateau;
# at 0.02 every seed and precision we tried leaves it within 2 epochs, while one-cycle's warm-up
# or lr 0.05 kept some runs on it.
SMALL_RUN = [
    "--data.init_args.num_train",
    "3500",
    "--data.init_args.val_images",
    "500",
    "--data.init_args.num_test",
    "500",
    "--data.init_args.batch_size",
    "32",
    "--model.init_args.schedule",
    "constant",
    "--model.init_args.lr",
    "0.02",
    *QUIET,
]


@pytest.fixture(scope="session")
def shapes_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's quick start, run once per test run: the export file of the trained small CNN."""
    root = once_per_run(tmp_path_factory, "quickstart", lambda root: fit(root, "victim_shapes", shrink=QUIET))
    return root / "exports" / "victim_shapes.pt"


@pytest.fixture(scope="session")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 JPEG tree from ../shared/data, extracted once per test run."""
    tarball = next((path for path in CIFAR_TARBALLS if path.is_file()), None)
    if tarball is None:
        pytest.skip(
            f"real CIFAR-10 data absent: none of {[str(path) for path in CIFAR_TARBALLS]} (../shared/data beside the "
            "checkout)"
        )

    def extract(root: Path) -> None:
        with tarfile.open(tarball) as archive:
            archive.extractall(root, filter="data")

    return once_per_run(tmp_path_factory, "cifar10", extract)


TWO_CPU_PROCESSES = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


# Validation on 2 batches of 16 images (an int: `1` would read as 1.0, all of them).
SMALL_VALIDATION = ["--data.init_args.eval_batch_size", "16", "--trainer.limit_val_batches", "2"]


def run_dirs(tmp_path: Path, name: str) -> list[str]:
    return ["--run.name", name, "--run.root", str(tmp_path / "runs"), "--run.export_dir", str(tmp_path / "exports")]


def fit(tmp_path: Path, name: str, *extra: str, shrink: list[str] = SMALL_RUN) -> RestorationCLI:
    """`train.py fit` on the quick-start config (shrunk unless told otherwise), in this process."""
    with torch_flags_kept():
        return RestorationCLI(args=["fit", "--config", QUICKSTART_CONFIG, *shrink, *run_dirs(tmp_path, name), *extra])


def restorer_args(config: str, victim: Path, root: Path, name: str, steps: int, *extra: str) -> list[str]:
    """`train.py fit` arguments: a tiny restorer config on the embedded shapes, shrunk to `steps`
    steps of 32 images (one epoch; 200 more images held out for validation), against `victim`."""
    return [
        "fit",
        "--config",
        config,
        *QUIET,
        *run_dirs(root, name),
        "--model.init_args.classifier",
        str(victim),
        "--data.init_args.num_train",
        str(32 * steps + 200),
        "--data.init_args.num_test",
        "500",
        "--data.init_args.val_images",
        "200",
        "--data.init_args.batch_size",
        "32",
        "--trainer.max_epochs",
        "1",
        *extra,
    ]


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A project script in a fresh Python process (needed where Lightning launches processes)."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
