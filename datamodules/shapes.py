"""The embedded default data set: ten classes of textured shapes, drawn from a seed, no files.

Each image is a shape (the class) of random position, size, rotation and colour, with its own
stripe texture, on a background with a colour gradient and a stripe texture of random frequency
and orientation. Edges are anti-aliased. Classification needs shape, not colour; restoration
has edges and fine texture to recover. The same seed always gives the same images, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from datamodules.base import ImageSplit, Split, TensorImageDataModule
from datamodules.registry import register_data_set

SHAPE_CLASSES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "crescent",
    "bar",
    "two_dots",
    "ell",
)


def _box(u: Tensor, v: Tensor, half_u: float, half_v: float) -> Tensor:
    """Signed distance to an axis-aligned box centred at the origin (negative inside)."""
    qu, qv = u.abs() - half_u, v.abs() - half_v
    outside = torch.sqrt(qu.clamp(min=0) ** 2 + qv.clamp(min=0) ** 2)
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _circle(u: Tensor, v: Tensor, radius: float) -> Tensor:
    return torch.sqrt(u**2 + v**2) - radius


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    # Intersection of three half-planes: an equilateral triangle with circumradius 1.
    sides = [math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    return torch.stack([u * math.cos(a) + v * math.sin(a) - 0.5 for a in sides]).amax(0)


def _star(u: Tensor, v: Tensor) -> Tensor:
    return torch.sqrt(u**2 + v**2) - (0.55 + 0.4 * torch.cos(5 * torch.atan2(v, u)))


# Signed distance of each class's shape in units of the shape's radius; (u, v) are rotated,
# centred coordinates. Shapes were picked to stay distinct under any rotation.
_SHAPE_SDF: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "disk": lambda u, v: _circle(u, v, 1.0),
    "ring": lambda u, v: (_circle(u, v, 0.8)).abs() - 0.22,
    "square": lambda u, v: _box(u, v, 0.8, 0.8),
    "triangle": _triangle,
    "cross": lambda u, v: torch.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0)),
    "star": _star,
    "crescent": lambda u, v: torch.maximum(_circle(u, v, 1.0), -_circle(u - 0.45, v, 0.85)),
    "bar": lambda u, v: _box(u, v, 1.0, 0.28),
    "two_dots": lambda u, v: torch.minimum(_circle(u - 0.55, v, 0.42), _circle(u + 0.55, v, 0.42)),
    "ell": lambda u, v: torch.minimum(_box(u + 0.45, v, 0.28, 1.0), _box(u - 0.085, v + 0.72, 0.815, 0.28)),
}


def _uniform(g: torch.Generator, n: int, low: float, high: float, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g, device=g.device) * (high - low) + low


def _stripes(g: torch.Generator, n: int, ys: Tensor, xs: Tensor, max_amplitude: float) -> Tensor:
    """Sinusoidal stripes of random amplitude, frequency (0.08-0.4 cycles/px), angle and phase."""
    amplitude = _uniform(g, n, 0.0, max_amplitude, 1, 1, 1)
    frequency = _uniform(g, n, 0.08, 0.4, 1, 1, 1)
    angle = _uniform(g, n, 0.0, math.pi, 1, 1, 1)
    phase = _uniform(g, n, 0.0, 2 * math.pi, 1, 1, 1)
    along = xs * torch.cos(angle) + ys * torch.sin(angle)
    return amplitude * torch.sin(2 * math.pi * frequency * along + phase)


def _ramp(g: torch.Generator, n: int, ys: Tensor, xs: Tensor, size: int) -> Tensor:
    """A linear brightness ramp of random direction, +-0.125 at the image borders at most."""
    slope = _uniform(g, n, -0.25, 0.25, 1, 1, 1)
    angle = _uniform(g, n, 0.0, 2 * math.pi, 1, 1, 1)
    return slope * ((xs - size / 2) * torch.cos(angle) + (ys - size / 2) * torch.sin(angle)) / size


def _colours(g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """Background and foreground RGB colours, (n,3,1,1) each, at least 0.35 apart in RGB."""
    background = torch.rand(n, 3, generator=g, device=g.device) * 0.8 + 0.1
    foreground = torch.rand(n, 3, generator=g, device=g.device) * 0.8 + 0.1
    too_close = (foreground - background).norm(dim=1, keepdim=True) < 0.35
    pushed = background + 0.45 * torch.sign(0.5 - background)
    foreground = torch.where(too_close, pushed, foreground)
    return background[..., None, None], foreground[..., None, None]


def _coverage(labels: Tensor, u: Tensor, v: Tensor, radius_px: Tensor) -> Tensor:
    """Anti-aliased shape coverage in [0,1], (n,1,H,W), one pixel of edge ramp."""
    coverage = torch.empty_like(u)
    for index, name in enumerate(SHAPE_CLASSES):
        members = labels == index
        distance_px = _SHAPE_SDF[name](u[members], v[members]) * radius_px[members]
        coverage[members] = (0.5 - distance_px).clamp(0.0, 1.0)
    return coverage


def render_shapes(num_images: int, seed: int, image_size: int = 32) -> tuple[Tensor, Tensor]:
    """Draw a class-balanced set of textured shape images.

    Returns images (N,3,S,S) uint8 and labels (N,) int64 in [0, 10); class i is SHAPE_CLASSES[i].
    """
    if num_images < 1 or image_size < 16:
        raise ValueError(f"need num_images >= 1 and image_size >= 16, got {num_images}, {image_size}")
    g = torch.Generator().manual_seed(seed)
    n, size = num_images, image_size
    labels = (torch.arange(n, device=g.device) % len(SHAPE_CLASSES))[torch.randperm(n, generator=g, device=g.device)]
    ys, xs = torch.meshgrid(
        torch.arange(size, device=g.device) + 0.5, torch.arange(size, device=g.device) + 0.5, indexing="ij"
    )
    ys, xs = ys.expand(n, 1, size, size), xs.expand(n, 1, size, size)

    centre = size / 2 + _uniform(g, n, -0.15 * size, 0.15 * size, 2, 1, 1)
    radius_px = _uniform(g, n, 0.22 * size, 0.36 * size, 1, 1, 1)
    angle = _uniform(g, n, 0.0, 2 * math.pi, 1, 1, 1)
    dx, dy = xs - centre[:, :1], ys - centre[:, 1:]
    u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / radius_px
    v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / radius_px
    coverage = _coverage(labels, u, v, radius_px)

    background_colour, foreground_colour = _colours(g, n)
    background = background_colour + _ramp(g, n, ys, xs, size) + _stripes(g, n, ys, xs, 0.12)
    foreground = foreground_colour + _stripes(g, n, ys, xs, 0.15)
    image = background * (1 - coverage) + foreground * coverage
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels


@register_data_set("shapes")
class Shapes(TensorImageDataModule):
    """The embedded default: textured shapes drawn in memory from `shapes_seed`, no files.

    The training and test splits are drawn from different seeds derived from `shapes_seed`;
    the data are the same whatever the training seed, so runs with different seeds compare.
    `val_images` of the `num_train` training images are held out for validation (see the base class).
    """

    class_names = SHAPE_CLASSES

    def __init__(
        self,
        num_train: int = 20000,
        num_test: int = 2000,
        image_size: int = 32,
        shapes_seed: int = 0,
        val_images: int = 2000,
        **kwargs: Any,
    ) -> None:
        super().__init__(val_images=val_images, **kwargs)
        self.num_train = num_train
        self.num_test = num_test
        self.image_size = image_size
        self.shapes_seed = shapes_seed

    def load_split(self, split: Split) -> ImageSplit:
        count, offset = (self.num_train, 0) if split == "train" else (self.num_test, 1)
        return ImageSplit(*render_shapes(count, seed=2 * self.shapes_seed + offset, image_size=self.image_size))
