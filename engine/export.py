"""The export format every trained model of this project is saved in, and read back with.

An export is a plain dict that `torch.load(weights_only=True)` accepts (tensors, str, int,
float, bool, None, lists and dicts of them; no pickled classes):

    {"format": "restoration-defense-export", "version": 1, "kind": "classifier" | ...,
     "model": {everything needed to rebuild the module: architecture name and arguments, ...},
     "state_dict": {name: tensor}, "meta": {run, epochs, metrics, library versions, commit}}

Files are written atomically (temporary file in the same folder, then rename), so a crash
mid-write never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from engine.errors import InputError

EXPORT_FORMAT = "restoration-defense-export"
# 2: a restorer's "model" holds its "network" and "defense" settings (restorers/base.py). Version 1
# files (per-kind layouts) still load: each restorer kind reads its own (settings_from_v1).
EXPORT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class NotAnExportError(InputError):
    """A file handed to us is not an export of this project (or not one of the kind expected)."""


class MissingFileError(InputError, FileNotFoundError):
    """A file handed to us does not exist."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(stream) on a temporary file in `path`'s folder, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the group
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` through a temporary file in the same folder and an atomic rename."""
    return _atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` atomically (results files, images)."""
    return _atomic_write(path, lambda stream: stream.write(data))


def save_new_export(make: Callable[[], dict[str, Any]], out: str | os.PathLike, overwrite: bool) -> Path:
    """Write the export dict that make() builds to `out`, atomically; refuses to replace an existing
    file unless `overwrite` (checked before make() runs, so a refusal costs nothing)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"'{out}' exists; pass --overwrite to replace it")
    return atomic_save(make(), out)


def export_command(description: str, what: str, export_checkpoint: Callable[[str, str, bool], Path]) -> None:
    """The command line of `python -m classifiers.export` and `python -m restorers.export`."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoint", help=f"a .ckpt written by `train.py fit` with {what}")
    parser.add_argument("out", help="the export file to write, e.g. checkpoints/<run>.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export file")
    args = parser.parse_args()
    print(f"exported {export_checkpoint(args.checkpoint, args.out, args.overwrite)}")


def load_weights_only(path: str | os.PathLike, what: str) -> Any:
    """torch.load(weights_only=True) with errors that say what the file was expected to be."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:
        raise NotAnExportError(
            f"refusing '{path}' as a {what}: weights-only loading rejects it ({_unpickler_reason(refused)}). "
            "Only files of plain tensors and containers are loaded; export trusted models with this "
            "project's export command."
        ) from refused
    except Exception as broken:  # torch.load fails on junk in many ways (EOFError, struct.error, ...)
        raise NotAnExportError(
            f"refusing '{path}' as a {what}: not a readable torch file ({type(broken).__name__}: {broken})"
        ) from broken


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The one informative sentence of torch's weights-only error, e.g. 'Unsupported global: GLOBAL x.Y'."""
    _, _, detail = str(error).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return lines[0] if lines else "not a file written by torch.save"


def make_export(
    kind: str, model: dict[str, Any], state_dict: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """Assemble an export dict; tensors are detached, made contiguous and moved to the CPU."""
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "kind": kind,
        "model": model,
        "state_dict": weights,
        "meta": {**environment_meta(), **meta},
    }


def read_export(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Load and check an export file; `kind` (e.g. "classifier") is enforced when given."""
    return check_export(load_weights_only(path, "export file"), path, kind)


def check_export(payload: Any, path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """`payload` (loaded from `path`) if it is an export of this version and kind, else NotAnExportError."""
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise NotAnExportError(
            f"'{path}' is not an export of this project (no format '{EXPORT_FORMAT}'); "
            "a Lightning .ckpt can be exported with `python -m classifiers.export RUN.ckpt OUT.pt` (a classifier's) "
            "or `python -m restorers.export RUN.ckpt OUT.pt` (a restorer's)"
        )
    if payload.get("version") not in READABLE_VERSIONS:
        raise NotAnExportError(
            f"'{path}' is export version {payload.get('version')}; this code reads versions {READABLE_VERSIONS}"
        )
    if kind is not None and payload.get("kind") != kind:
        raise NotAnExportError(f"'{path}' exports a {payload.get('kind')}, not a {kind}")
    return payload


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes: what results and exports record of the victim they used."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_commit() -> str:
    """The project's HEAD commit, with '+dirty' when tracked files have uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses (what results and benchmarks record)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment_meta() -> dict[str, str]:
    import pytorch_lightning

    return {
        "commit": git_commit(),
        "torch": str(torch.__version__),
        "pytorch_lightning": str(pytorch_lightning.__version__),
        "python": platform.python_version(),
    }
