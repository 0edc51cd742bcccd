from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from classifiers import (
    ARCHITECTURES,
    FrozenClassifier,
    PretrainedWeightsUnavailable,
    VictimModule,
    build_classifier,
    load_classifier,
)
from engine.export import NotAnExportError, atomic_save, make_export


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("resnet18_cifar", {"width": 8}),
        ("preact_resnet18", {"width": 8}),
        ("small_cnn", {}),
        ("timm/resnet10t", {}),
        ("torchvision/resnet18", {}),
    ],
)
@pytest.mark.parametrize("in_chans, size", [(3, 32), (1, 28)])
def test_architectures_map_images_to_logits(arch: str, kwargs: dict, in_chans: int, size: int):
    if arch.startswith("torchvision/") and in_chans != 3:
        with pytest.raises(ValueError, match="3 input channels"):
            build_classifier(arch, 7, in_chans, **kwargs)
        return
    net = build_classifier(arch, num_classes=7, in_chans=in_chans, **kwargs)
    assert net(torch.rand(2, in_chans, size, size)).shape == (2, 7)


def test_resnet18_cifar_has_the_standard_size():
    assert sum(p.numel() for p in build_classifier("resnet18_cifar", 10, 3).parameters()) == 11_173_962


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(ValueError, match="small_cnn") as error:
        build_classifier("resnet_unknown", 10, 3)
    assert all(name in str(error.value) for name in ARCHITECTURES)
    with pytest.raises(ValueError, match="timm has no model"):
        build_classifier("timm/not_a_model", 10, 3)


def test_offline_pretrained_weights_give_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_HOME"):
        build_classifier("timm/resnet10t", 10, 3, pretrained=True)


def test_frozen_classifier_stays_frozen_and_passes_input_gradients():
    net = build_classifier("small_cnn", 10, 3)
    classifier = FrozenClassifier(net, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    parent = nn.Sequential(nn.Conv2d(3, 3, 1), classifier)
    parent.train()  # what Lightning, or an attack library, does to a whole model
    running_mean = net.body[0][1].running_mean.clone()

    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    loss = nn.functional.cross_entropy(parent(x), torch.arange(4))
    (grad,) = torch.autograd.grad(loss, x)

    assert not classifier.training and not net.training
    assert all(not p.requires_grad for p in classifier.parameters())
    assert grad.abs().sum() > 0
    assert torch.equal(net.body[0][1].running_mean, running_mean)  # BatchNorm did not update
    assert set(classifier.state_dict()) == {f"net.{k}" for k in net.state_dict()}  # mean/std are not weights


def test_normalization_happens_inside():
    net = build_classifier("small_cnn", 10, 3)
    x = torch.rand(2, 3, 32, 32)
    classifier = FrozenClassifier(net, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(classifier(x), net.eval()((x - mean) / std))


def test_exported_victim_rebuilds_with_the_same_outputs(tmp_path: Path):
    victim = VictimModule(arch="preact_resnet18", arch_kwargs={"width": 8}, mean=[0.5] * 3, std=[0.25] * 3).eval()
    path = atomic_save(victim.to_export({"note": "test"}), tmp_path / "victim.pt")
    loaded = load_classifier(path)
    x = torch.rand(3, 3, 32, 32)
    assert isinstance(loaded, FrozenClassifier)
    assert torch.equal(loaded(x), victim(x))
    assert torch.load(path, weights_only=True)["meta"]["note"] == "test"


class _NotATensor:
    pass


def test_foreign_pickles_and_other_files_are_refused(tmp_path: Path):
    with_object = tmp_path / "object.pt"
    torch.save({"state_dict": _NotATensor()}, with_object)
    with pytest.raises(NotAnExportError, match="refusing.*Unsupported global.*_NotATensor"):
        load_classifier(with_object)

    for name, write in (
        ("pickle.pt", lambda s: pickle.dump({"a": _NotATensor()}, s)),
        ("garbage.pt", lambda s: s.write(b"junk")),
    ):
        with open(tmp_path / name, "wb") as stream:
            write(stream)
        with pytest.raises(NotAnExportError, match="refusing"):
            load_classifier(tmp_path / name)

    plain = atomic_save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(NotAnExportError, match="not an export of this project"):
        load_classifier(plain)

    other_kind = atomic_save(make_export("restorer", {}, {}, {}), tmp_path / "restorer.pt")
    with pytest.raises(NotAnExportError, match="not a classifier"):
        load_classifier(other_kind)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")


def test_victim_starts_from_a_weights_file_strictly(tmp_path: Path):
    source = VictimModule(arch="small_cnn")
    weights = atomic_save(source.classifier.net.state_dict(), tmp_path / "weights.pt")
    clone = VictimModule(arch="small_cnn", weights=str(weights))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(clone.eval()(x), source.eval()(x))
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        VictimModule(arch="small_cnn", arch_kwargs={"widths": [8, 16, 32]}, weights=str(weights))


def test_a_weights_file_that_is_an_export_of_another_kind_is_refused(tmp_path: Path):
    restorer = atomic_save(make_export("restorer", {}, {}, {}), tmp_path / "restorer.pt")
    with pytest.raises(NotAnExportError, match="not a classifier"):
        VictimModule(arch="small_cnn", weights=str(restorer))
    exported = atomic_save(VictimModule(arch="small_cnn").to_export({}), tmp_path / "victim.pt")
    assert VictimModule(arch="small_cnn", weights=str(exported)) is not None
