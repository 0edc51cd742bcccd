"""A CPU check for a class of device bugs that only a GPU used to show: tensors the project's code
creates without saying on which device.

On a GPU, `torch.zeros(n)` or `torch.tensor(values)` lands on the CPU while the batch sits on CUDA:
the first operation that mixes the two fails ("Expected all tensors to be on the same device"),
or a generator on the wrong device is refused. On a CPU-only machine both sit on the CPU and
nothing fails, so CI never saw it. Inside `implicit_device_audit()`, every tensor factory
(torch.zeros, torch.tensor, torch.rand, torch.arange, ... : the functions torch's own default-device
context intercepts) called directly from the project's source without `device=` raises
ImplicitDeviceError, naming the file and line. Code that means the CPU says `device="cpu"`.

Not audited, on purpose:
- library code (torch, Lightning, torchmetrics, pyautoattack, foolbox): a library that creates a
  tensor on the CPU and moves it is not wrong, and the `gpu` test tier runs libraries on CUDA;
- a module's `__init__` and import-time constants: parameters and buffers are made on the default
  device and follow the module when it moves (`trainer.init_module()` relies on exactly that);
- the tensor-following constructors (`x.new_zeros`, `torch.zeros_like`), right by design.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

REPO_ROOT = Path(__file__).resolve().parent.parent
# The project's source: everything but the tests (which build CPU fixtures on purpose).
PROJECT_SOURCE = tuple(
    str(REPO_ROOT / name)
    for name in (
        "attacks",
        "classifiers",
        "datamodules",
        "defenses",
        "engine",
        "evaluation",
        "restorers",
        "benchmarks",
        "scripts",
        "eval.py",
        "train.py",
    )
)
# Frames between the caller and this mode that belong to torch's dispatch machinery, not to the caller.
_DISPATCH_FILES = (
    str(Path(torch.__file__).parent / "overrides.py"),
    str(Path(torch.__file__).parent / "utils" / "_device.py"),
    __file__,
)


class ImplicitDeviceError(RuntimeError):
    """A project file created a tensor without `device=`: on a GPU it would sit on the CPU."""


def _caller(skip: Sequence[str]) -> FrameType | None:
    """The frame that called the tensor factory (torch's dispatch frames skipped)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename in skip:
        frame = frame.f_back
    return frame


def _places_on_the_default_device(frame: FrameType) -> bool:
    """A module's constructor or import-time code: the default device is the right one there."""
    if frame.f_code.co_name == "<module>":
        return True
    return frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), nn.Module)


class ImplicitDeviceAudit(TorchFunctionMode):
    """Raises ImplicitDeviceError when code under `roots` calls a default-device tensor factory
    without `device=` (see the module docstring)."""

    def __init__(self, roots: Sequence[str] = PROJECT_SOURCE) -> None:
        super().__init__()
        self.roots = tuple(roots)
        self.factories = _device_constructors()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None and not _converts_a_tensor(func, args):
            frame = _caller(_DISPATCH_FILES)
            if (
                frame is not None
                and frame.f_code.co_filename.startswith(self.roots)
                and not _places_on_the_default_device(frame)
            ):
                filename, line = frame.f_code.co_filename, frame.f_lineno
                where = Path(filename).relative_to(REPO_ROOT) if filename.startswith(str(REPO_ROOT)) else filename
                raise ImplicitDeviceError(
                    f"{where}:{line} calls torch.{func.__name__} without device=: on a GPU that tensor sits on the CPU "
                    "while the data is on CUDA. Pass the device of the data it meets (device=x.device), or "
                    "device='cpu' where the CPU is meant."
                )
        return func(*args, **kwargs)


def _converts_a_tensor(func: Callable, args: tuple) -> bool:
    """torch.as_tensor(t) / torch.asarray(t) of a tensor keep its device: not a new placement."""
    return func.__name__ in ("as_tensor", "asarray") and bool(args) and isinstance(args[0], torch.Tensor)


@contextlib.contextmanager
def implicit_device_audit(roots: Sequence[str] = PROJECT_SOURCE) -> Iterator[None]:
    """Within the block, the project's code must say where every tensor it creates lives."""
    with ImplicitDeviceAudit(roots):
        yield


@contextlib.contextmanager
def audit_paused() -> Iterator[None]:
    """Within the block, no audit: torch.compile (dynamo) cannot trace through a Python function mode
    ("name '___get_torch_function_mode_stack_at' is not defined"), so compiled code runs without it."""
    stack = torch.overrides._get_current_function_mode_stack()
    if not any(isinstance(mode, ImplicitDeviceAudit) for mode in stack):
        yield
        return
    with torch.overrides._pop_mode_temporarily() as mode:
        assert isinstance(mode, ImplicitDeviceAudit), f"another function mode is on top: {mode}"
        yield
