"""Class activation maps of any classifier, their strongest peaks, and boxes around the peaks.

CAM (Zhou et al. 2016) applies when the classifier ends in global average pooling and a linear
layer: the map of class c is sum_k w_ck A_k, with A (N,K,h,w) the last feature map and w the
linear layer's weights. Where it does not apply, Grad-CAM (Selvaraju et al. 2017) weighs A_k by
the spatial mean of d logit_c / d A_k and keeps the positive part; on a pooling head the two agree
up to that ReLU and a factor 1/(h w) (tests check it).

`locate_cam_layers` finds both layers from one forward pass with hooks: the feature map is the
output of the last module that returns a spatial (N,K,h,w) map with h*w > 1, the head is the
last nn.Linear, and CAM applies when that Linear's input is the spatial mean of the map. A
network whose last activation is functional after a module (a pre-activation ResNet's final
BN-ReLU) fails that test and gets Grad-CAM on the module's output, unless `layer` names the
module whose output the head pools.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class CamLayers:
    """features: the module whose output is the last feature map; head: the pooling head's
    linear layer when CAM applies, None for Grad-CAM."""

    features: nn.Module
    head: nn.Linear | None


def _record_outputs(
    classifier: nn.Module, x: Tensor
) -> tuple[list[tuple[nn.Module, Tensor]], list[tuple[nn.Linear, Tensor]]]:
    """Run the classifier once; (module, output) of every spatial map in call order, (linear, input) of every Linear."""
    maps: list[tuple[nn.Module, Tensor]] = []
    linears: list[tuple[nn.Linear, Tensor]] = []

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(module, nn.Linear):
            linears.append((module, inputs[0]))
        elif isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1:
            maps.append((module, output))

    handles = [module.register_forward_hook(hook) for module in classifier.modules()]
    try:
        with torch.no_grad():
            classifier(x)
    finally:
        for handle in handles:
            handle.remove()
    return maps, linears


def locate_cam_layers(classifier: nn.Module, x: Tensor, layer: str | None = None) -> CamLayers:
    """The feature layer (named `layer`, or found) and, when the head pools it, the head (see module docstring).

    x: (N,C,H,W) float in [0,1], a sample of the images the maps will be computed on.
    """
    maps, linears = _record_outputs(classifier, x)
    if layer is not None:
        named = dict(classifier.named_modules())
        if layer not in named:
            raise ValueError(
                f"the classifier has no module {layer!r}; its modules: {[name for name in named if name][:40]}"
            )
        maps = [(module, output) for module, output in maps if module is named[layer]]
        if not maps:
            raise ValueError(f"module {layer!r} does not return a spatial map (N,K,h,w) with h*w > 1")
    if not maps:
        raise ValueError(
            "the classifier has no module returning a spatial feature map; CAMs need a convolutional network"
        )
    features, feature_map = maps[-1]
    if linears:
        head, pooled = linears[-1]
        if pooled.dim() == 2 and pooled.shape == feature_map.shape[:2] and _is_mean(feature_map, pooled):
            return CamLayers(features, head)
    return CamLayers(features, None)


def _is_mean(feature_map: Tensor, pooled: Tensor) -> bool:
    """Whether pooled (N,K) is the spatial mean of feature_map (N,K,h,w), up to the rounding of the
    lower of their precisions: under bf16 autocast the pooled vector is rounded to 8 bits of mantissa,
    so a fixed fp32 tolerance would send a pooling head to Grad-CAM on the GPU only."""
    resolution = max(torch.finfo(feature_map.dtype).eps, torch.finfo(pooled.dtype).eps)
    rtol = max(1e-3, 4 * resolution)
    return torch.allclose(feature_map.float().mean((2, 3)), pooled.float(), rtol=rtol, atol=rtol / 10)


def _capture(classifier: nn.Module, module: nn.Module, x: Tensor, as_leaf: bool = False) -> tuple[Tensor, Tensor]:
    """(logits (N,K), the module's output) from one forward pass.

    as_leaf: the output is captured as a leaf that requires grad, and the rest of the network runs
    on a copy of it, so that logits can be differentiated with respect to it even when nothing
    upstream requires grad (a frozen classifier on a detached input); the copy leaves in-place
    layers after the module free to modify it.
    """
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        if as_leaf:
            output = output.detach().requires_grad_(True)
        captured.append(output)
        return output.clone() if as_leaf else output

    handle = module.register_forward_hook(hook)
    try:
        logits = classifier(x)
    finally:
        handle.remove()
    return logits, captured[-1]


def class_activation_maps(
    classifier: nn.Module, x: Tensor, top_classes: int, layers: CamLayers
) -> tuple[Tensor, Tensor]:
    """Maps of each image's `top_classes` highest-scoring classes, upsampled bilinearly to the image.

    x: (N,C,H,W) float in [0,1]. Returns (maps (N,top_classes,H,W) float, classes (N,top_classes)
    long, best first). Nothing is differentiated with respect to x (the maps are detached).
    """
    x = x.detach()
    if layers.head is not None:
        with torch.no_grad():
            logits, feature_map = _capture(classifier, layers.features, x)
            classes = logits.topk(top_classes, dim=1).indices
            weights = layers.head.weight.float()[classes]  # (N,top,K)
            maps = torch.einsum("ntk,nkhw->nthw", weights, feature_map.float())
    else:
        maps, classes = _grad_cam(classifier, x, top_classes, layers.features)
    return F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False), classes


def _grad_cam(classifier: nn.Module, x: Tensor, top_classes: int, features: nn.Module) -> tuple[Tensor, Tensor]:
    """Grad-CAM maps (N,top,h,w) at the feature map's resolution, and the classes (N,top)."""
    with torch.enable_grad():
        logits, feature_map = _capture(classifier, features, x, as_leaf=True)
        classes = logits.topk(top_classes, dim=1).indices.detach()
        maps = []
        for rank in range(top_classes):
            score = logits.gather(1, classes[:, rank : rank + 1]).sum()
            (gradient,) = torch.autograd.grad(score, feature_map, retain_graph=rank + 1 < top_classes)
            weights = gradient.float().mean((2, 3), keepdim=True)
            maps.append(F.relu((weights * feature_map.detach().float()).sum(1)))
    return torch.stack(maps, 1), classes


def peak_coordinates(maps: Tensor, count: int, radius: int) -> Tensor:
    """The `count` strongest peaks of each map, with non-maximum suppression: after each peak, every
    pixel within Chebyshev distance `radius` of it is out of the running.

    maps: (M,H,W) float -> (M,count,2) long (row, column), strongest first.
    """
    height, width = maps.shape[-2:]
    rows = torch.arange(height, device=maps.device).view(1, height, 1)
    columns = torch.arange(width, device=maps.device).view(1, 1, width)
    scores = maps.float().clone()
    peaks = []
    for _ in range(count):
        index = scores.flatten(1).argmax(1)
        row, column = (index // width).view(-1, 1, 1), (index % width).view(-1, 1, 1)
        peaks.append(torch.stack([row.view(-1), column.view(-1)], 1))
        near = ((rows - row).abs() <= radius) & ((columns - column).abs() <= radius)
        scores = scores.masked_fill(near, float("-inf"))
    return torch.stack(peaks, 1)


def box_mask(peaks: Tensor, half_width: int, size: tuple[int, int]) -> Tensor:
    """Union of square boxes of side 2*half_width+1 centred on the peaks, cut at the image border.

    peaks: (M,P,2) long (row, column) -> (M,1,H,W) float, 1 inside a box and 0 elsewhere.
    """
    height, width = size
    rows = torch.arange(height, device=peaks.device).view(1, 1, height, 1)
    columns = torch.arange(width, device=peaks.device).view(1, 1, 1, width)
    row, column = peaks[..., 0, None, None], peaks[..., 1, None, None]
    inside = ((rows - row).abs() <= half_width) & ((columns - column).abs() <= half_width)  # (M,P,H,W)
    return inside.any(1, keepdim=True).float()
