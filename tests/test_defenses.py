from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attacks import GradientAttack, input_gradient
from classifiers import load_classifier
from datamodules import render_shapes
from defenses import (
    BitDepth,
    DefendedClassifier,
    Jpeg,
    MedianFilter,
    RandomResizePad,
    StructuredRandomization,
    WaveletDenoise,
    circular_shift,
    make_defense,
    parse_spec,
    wavelet_denoise,
)
from defenses.factory import DEFENSES, build_defense
from engine.export import NotAnExportError

BASELINES = [
    "identity",
    "jpeg:quality=75",
    "bit_depth:bits=4",
    "median:kernel=3",
    "bicubic:factor=2",
    "wavelet",
    "random_resize_pad:max_pad=4",
    "srd:min_size=16,max_size=28,max_shift=2",
]


@pytest.fixture(scope="module")
def noisy_shapes() -> torch.Tensor:
    """8 shapes images with Gaussian noise (std 0.03), float64 in [0,1]."""
    images, _ = render_shapes(8, seed=3)
    x = images.double() / 255
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (x + 0.03 * noise).clamp(0, 1)


@pytest.mark.parametrize(
    "wavelet, sigma, levels, ycbcr",
    [
        ("db1", None, None, True),
        ("db2", None, None, True),
        ("db1", 0.04, None, True),
        ("sym4", None, 2, True),
        ("db1", None, None, False),
    ],
)
def test_wavelet_denoiser_matches_skimage(noisy_shapes, wavelet, sigma, levels, ycbcr):
    from skimage.restoration import denoise_wavelet

    ours = wavelet_denoise(noisy_shapes.float(), wavelet, levels, sigma, ycbcr).double()
    reference = torch.stack(
        [
            torch.from_numpy(
                denoise_wavelet(
                    image.permute(1, 2, 0).numpy(),
                    sigma=sigma,
                    wavelet=wavelet,
                    wavelet_levels=levels,
                    method="BayesShrink",
                    mode="soft",
                    convert2ycbcr=ycbcr,
                    channel_axis=-1,
                )
            ).permute(2, 0, 1)
            for image in noisy_shapes
        ]
    ).clamp(0, 1)  # skimage leaves float output unclipped
    assert (ours - reference).abs().max() < 1e-4
    assert (noisy_shapes - reference).abs().mean() > 0.01  # and it did denoise


def test_wavelet_denoiser_is_batched_and_differentiable(noisy_shapes):
    x = noisy_shapes.float().requires_grad_(True)
    one_by_one = torch.cat([wavelet_denoise(image[None]) for image in x])
    assert torch.allclose(wavelet_denoise(x), one_by_one, atol=1e-6)
    (gradient,) = torch.autograd.grad(wavelet_denoise(x).sum(), x)
    assert gradient.abs().sum() > 0


@pytest.mark.parametrize("spec", BASELINES)
def test_baselines_map_unit_images_to_unit_images(spec):
    defense = make_defense(spec)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = defense(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert parse_spec(spec)["name"] == defense.spec()["name"]


# Beyond the defaults, only where the default is slow (DIP fits 300 steps per image).
SMALL = {"dip": {"iterations": 4, "record_every": 2, "warmup_records": 1}}


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_registered_defense_rebuilds_from_its_spec(name: str, shapes_victim: Path):
    """A DEFENSES entry needs nothing more: its spec() names it and rebuilds the same defense,
    which maps [0,1] images to [0,1] images of the same shape, the same pixels for the same seed."""
    classifier = load_classifier(shapes_victim)
    defense = build_defense({"name": name, **SMALL.get(name, {})}, classifier)
    spec = defense.spec()
    rebuilt = build_defense(spec, classifier)
    assert spec["name"] == name and rebuilt.spec() == spec
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    defense.reseed(5)
    rebuilt.reseed(5)
    out = defense(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.allclose(rebuilt(x), out, atol=1e-6)


def test_jpeg_equals_pil_at_the_same_quality():
    images, _ = render_shapes(4, seed=5)
    ours = (Jpeg(quality=75)(images.float() / 255) * 255).round()
    for image, mine in zip(images, ours):
        stream = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(stream, format="jpeg", quality=75)
        theirs = torch.from_numpy(np.array(Image.open(stream))).permute(2, 0, 1).float()
        assert (mine - theirs).abs().max() <= 2  # libjpeg builds differ in IDCT rounding only


def test_median_filter_equals_scipy():
    from scipy.ndimage import median_filter

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    reference = median_filter(x.numpy(), size=(1, 1, 5, 5), mode="mirror")
    assert torch.allclose(MedianFilter(kernel=5)(x), torch.from_numpy(reference))


def test_bpda_forwards_the_defense_and_backwards_the_surrogate():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    defense = BitDepth(bits=3)
    out = defense.bpda(x)
    assert torch.equal(out, defense(x))
    (gradient,) = torch.autograd.grad((out * 2).sum(), x)
    assert torch.equal(gradient, torch.full_like(x, 2.0))
    (exact,) = torch.autograd.grad((defense(x) * 2).sum(), x)
    assert exact.abs().max() == 0  # rounding has no useful gradient: why BPDA exists


def test_bpda_defeats_bit_depth_reduction(shapes_victim: Path):
    """Athalye et al. (2018): bit-depth reduction masks gradients; BPDA walks straight through."""
    victim = load_classifier(shapes_victim)
    images, labels = render_shapes(200, seed=1)
    x = images.float() / 255
    defense = BitDepth(bits=4)  # rounding: the exact gradient is zero everywhere

    def accuracy(backward: str) -> float:
        attacker = DefendedClassifier(victim, defense, backward=backward)
        x_adv = GradientAttack("linf", 8 / 255, steps=20, random_start=False)(attacker, x, labels)
        with torch.no_grad():
            return (DefendedClassifier(victim, defense)(x_adv).argmax(1) == labels).float().mean().item()

    with torch.no_grad():
        clean = (DefendedClassifier(victim, defense)(x).argmax(1) == labels).float().mean().item()
    assert clean > 0.6
    assert accuracy("exact") == clean  # zero gradients: the exact-gradient attack never moves
    assert accuracy("bpda") < 0.05


def test_randomized_defense_draws_are_seeded():
    defense = RandomResizePad(max_pad=4)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    defense.reseed(7)
    first, second = defense(x), defense(x)
    defense.reseed(7)
    assert torch.equal(defense(x), first)
    assert not torch.equal(first, second)


def test_eot_gradient_averages_the_draws(shapes_victim: Path):
    victim = load_classifier(shapes_victim)
    images, labels = render_shapes(16, seed=1)
    x = images.float() / 255
    defense = RandomResizePad(max_pad=4)
    model = DefendedClassifier(victim, defense)
    defense.reseed(0)
    eot = input_gradient(model, x, labels, eot=4)
    defense.reseed(0)
    draws = [input_gradient(model, x, labels) for _ in range(4)]
    assert torch.allclose(eot, torch.stack(draws).mean(0), atol=1e-6)
    assert not torch.allclose(eot, draws[0], atol=1e-4)


def test_spec_errors_name_the_fix(tmp_path: Path, shapes_victim: Path):
    with pytest.raises(ValueError, match="takes \\['quality'\\]"):
        make_defense("jpeg:q=75")
    with pytest.raises(ValueError, match="unknown defense 'jpg'"):
        make_defense("jpg")
    with pytest.raises(ValueError, match="not key=value"):
        make_defense("median:3")
    with pytest.raises(NotAnExportError, match="pass it as --classifier"):
        make_defense(str(shapes_victim))
    with pytest.raises(ValueError, match="wavelet"):
        WaveletDenoise(wavelet="nope")


def test_structured_randomization_is_seeded_and_covers_its_ranges():
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    srd = StructuredRandomization(min_size=16, max_size=28, max_shift=2)
    srd.reseed(1)
    first, second = srd.randomize(x), srd.randomize(x)
    srd.reseed(1)
    assert torch.equal(srd.randomize(x), first)  # same seed, same draw
    assert not (first.shape == second.shape and torch.equal(first, second))  # a fresh draw per call
    sides = set()
    for seed in range(40):
        srd.reseed(seed)
        low = srd.randomize(x)
        assert low.shape[:2] == (5, 3) and low.shape[2] == low.shape[3] and 0 <= low.min() and low.max() <= 1
        sides.add(low.shape[-1])
    assert sides <= set(range(16, 29)) and len(sides) > 5
    assert srd(x).shape == x.shape  # alone as a defense it returns the input size
    shifts = torch.tensor([[1, -2], [0, 0], [-1, 3], [2, 1], [0, -1]])
    reference = torch.stack([torch.roll(image, (int(dy), int(dx)), dims=(1, 2)) for image, (dy, dx) in zip(x, shifts)])
    assert torch.equal(circular_shift(x, shifts), reference)
