"""Device placement on a machine with one device: what the CPU can check of the bugs a GPU shows.

The whole suite runs under tests/device_audit.py (conftest); these tests check the audit itself
and the Lightning ordering that once kept every restorer off the GPU. The rest of the class (JPEG,
autocast on CUDA, library attacks on CUDA) is in the `gpu` tier, tests/test_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning_fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin
from torch import nn

from restorers import restorer_class, restorer_kinds
from tests.device_audit import ImplicitDeviceAudit, ImplicitDeviceError

THIS_FILE = (str(Path(__file__)),)


def _noise_like_a_bug(x: torch.Tensor) -> torch.Tensor:
    return x + torch.rand(x.shape)  # the bug: on a GPU this noise is drawn on the CPU


def _noise_done_right(x: torch.Tensor) -> torch.Tensor:
    return x + torch.rand(x.shape, device=x.device)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([2.0]))  # follows the module when it moves: fine


def test_the_audit_names_the_line_that_creates_a_tensor_without_a_device():
    x = torch.zeros(2, 3)
    with ImplicitDeviceAudit(roots=THIS_FILE):
        with pytest.raises(ImplicitDeviceError, match=r"test_devices\.py:\d+ calls torch\.rand without device="):
            _noise_like_a_bug(x)
        assert _noise_done_right(x).shape == x.shape
        assert torch.equal(_Scaled().scale, torch.tensor([2.0], device="cpu"))  # a module's constructor is exempt


@pytest.mark.parametrize("kind", restorer_kinds())
def test_restorers_need_no_device_before_lightning_moves_them(kind: str, shapes_victim: Path):
    """Lightning calls `setup` before it moves the module to the GPU, but it already makes
    `self.device` say cuda there (pytorch_lightning.trainer.call._call_setup_hook). A restorer that
    ran its classifier on `self.device` in `setup` crashed on every GPU (issue 13). Here the early
    device is `meta`: any tensor made on it and fed to the classifier's CPU buffers fails."""
    module = restorer_class(kind)(classifier=str(shapes_victim))
    for child in module.modules():
        if isinstance(child, _DeviceDtypeModuleMixin):
            child._device = torch.device("meta")
    module.setup("fit")
    module.configure_model()


@pytest.mark.parametrize("kind", restorer_kinds())
def test_a_victim_of_other_data_is_refused_when_the_restorer_is_built(kind: str, shapes_victim: Path):
    with pytest.raises(ValueError, match="built for 10 classes, the data has 5; train the restorer on the data"):
        restorer_class(kind)(classifier=str(shapes_victim), num_classes=5)
    with pytest.raises(ValueError, match="built for 3 channels, the images have 1"):
        restorer_class(kind)(classifier=str(shapes_victim), in_chans=1)
