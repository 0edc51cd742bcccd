"""Build a classifier network by name.

Names: our own architectures (`resnet18_cifar`, `preact_resnet18`, `small_cnn`), any timm model
as `timm/<name>` and any torchvision model as `torchvision/<name>`. Every builder takes
(num_classes, in_chans, **arch_kwargs) and returns an nn.Module mapping normalized
(N,in_chans,H,W) images to (N,num_classes) logits; normalization is added by NormalizedClassifier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from classifiers.resnet_cifar import preact_resnet18, resnet18_cifar
from classifiers.small_cnn import SmallCNN

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "preact_resnet18": preact_resnet18,
    "small_cnn": SmallCNN,
}


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be fetched (usually: no internet); the message says where to put them."""


def _timm(name: str, num_classes: int, in_chans: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"timm has no model '{name}'; list them with `python -c \"import timm; "
            "print(timm.list_models('*resnet*'))\"`"
        )
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (OSError, RuntimeError) as failed:
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"could not fetch pretrained weights for timm/{name} ({type(failed).__name__}: {failed}). Offline? "
            "Fetch them on a connected machine into the Hugging Face cache (HF_HOME) and copy it here, or "
            "set `pretrained: false` and `weights: <state dict file>`."
        ) from failed


def _torchvision(name: str, num_classes: int, in_chans: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    from torchvision import models

    if name not in models.list_models():
        raise ValueError(f"torchvision has no model '{name}'; see torchvision.models.list_models()")
    if in_chans != 3:
        raise ValueError(f"torchvision/{name} takes 3 input channels, not {in_chans}: use timm/{name} or as_rgb data")
    if pretrained and num_classes != 1000:
        raise ValueError(
            f"torchvision's pretrained weights have 1000 classes, the data has {num_classes}: use timm/{name} "
            "(which replaces the head) or pretrained: false"
        )
    try:
        return models.get_model(name, weights="DEFAULT" if pretrained else None, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as failed:
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"could not fetch pretrained weights for torchvision/{name} ({type(failed).__name__}: {failed}). Offline? "
            "Put the weights file torchvision names in the error above into $TORCH_HOME/hub/checkpoints/ "
            "(default ~/.cache/torch/hub/checkpoints/)."
        ) from failed


HUB_FAMILIES: dict[str, Callable[..., nn.Module]] = {"timm": _timm, "torchvision": _torchvision}


def build_classifier(
    arch: str, num_classes: int, in_chans: int, pretrained: bool = False, **arch_kwargs: Any
) -> nn.Module:
    """A classifier network by name; `pretrained` only for the timm/ and torchvision/ families."""
    family, slash, name = arch.partition("/")
    if slash:
        if family not in HUB_FAMILIES:
            raise ValueError(f"unknown model family '{family}/' in '{arch}': use timm/<name> or torchvision/<name>")
        return HUB_FAMILIES[family](name, num_classes, in_chans, pretrained, **arch_kwargs)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown classifier '{arch}': choose one of {sorted(ARCHITECTURES)}, timm/<name> or torchvision/<name>"
        )
    if pretrained:
        raise ValueError(
            f"'{arch}' has no pretrained weights to fetch: train one (configs/victim_*.yaml) or pass `weights`"
        )
    return ARCHITECTURES[arch](num_classes=num_classes, in_chans=in_chans, **arch_kwargs)
