from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classifiers import FrozenClassifier, load_classifier
from classifiers.factory import build_classifier
from datamodules import render_shapes
from defenses import CIIDefence, TeleaInpainter, make_defense
from defenses.cam import box_mask, class_activation_maps, locate_cam_layers, peak_coordinates
from engine.cli import RestorationCLI
from evaluation import cli as evaluator_cli
from restorers import InpaintingNetwork
from restorers.export import module_from_checkpoint
from restorers.inpainter import smooth_fill
from tests.conftest import QUIET, REPO_ROOT, restorer_args, run_dirs

CII_CONFIG = str(REPO_ROOT / "configs" / "cii_shapes.yaml")
TELEA_CONFIG = str(REPO_ROOT / "configs" / "defenses" / "cii_telea_cifar10.yaml")
STEPS = 40


class RedDetector(nn.Module):
    """Class 0 scores redness, class 1 its absence: a 1x1 conv 'feature' of how much redder than
    grey each pixel is, pooled by `pool` (mean: CAM applies; max: it does not) and a linear head."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.act = nn.ReLU()
        self.head = nn.Linear(1, 2)
        self.pool = pool
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1))
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[10.0], [-10.0]]))
            self.head.bias.copy_(torch.tensor([0.0, 0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.act(self.conv(x))
        pooled = features.mean((2, 3)) if self.pool == "mean" else features.amax((2, 3))
        return self.head(pooled)


def planted_red_patches(count: int, size: int = 32, patch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise images, each with a red patch at a random place; (images, patch centres (count,2))."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.05 * torch.randn(count, 3, size, size, generator=generator)
    corners = torch.randint(0, size - patch, (count, 2), generator=generator)
    for image, (row, column) in zip(images, corners.tolist()):
        image[:, row : row + patch, column : column + patch] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return images.clamp(0, 1), corners + (patch - 1) / 2


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_cam_peaks_fall_on_a_planted_salient_patch(pool: str):
    model = RedDetector(pool).eval()
    images, centres = planted_red_patches(16)
    layers = locate_cam_layers(model, images[:1])
    assert layers.features is model.act and (layers.head is model.head) == (pool == "mean")  # CAM vs Grad-CAM
    maps, classes = class_activation_maps(model, images, 1, layers)
    assert (classes[:, 0] == 0).all()
    peaks = peak_coordinates(maps[:, 0], 1, 0)[:, 0].float()
    assert ((peaks - centres).abs() <= 2).all(), (peaks, centres)


def test_grad_cam_equals_relu_cam_on_a_pooling_head():
    """Selvaraju et al.'s identity: on global average pooling + linear, Grad-CAM = ReLU(CAM) / (h w)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).eval()
    images = torch.rand(4, 3, 12, 12)
    layers = locate_cam_layers(model, images)
    assert layers.head is model[6]
    cam, classes = class_activation_maps(model, images, 3, layers)
    grad_cam, same_classes = class_activation_maps(model, images, 3, type(layers)(layers.features, None))
    assert torch.equal(classes, same_classes)
    torch.testing.assert_close(grad_cam * 12 * 12, F.relu(cam), rtol=1e-4, atol=1e-5)


def test_cam_layers_of_our_victims():
    """Our CIFAR networks pool their last map with a functional mean: CAM applies to them."""
    images = torch.rand(2, 3, 32, 32)
    for arch in ("resnet18_cifar", "small_cnn"):
        net = build_classifier(arch, 10, 3, **({"width": 8} if arch == "resnet18_cifar" else {})).eval()
        layers = locate_cam_layers(net, images)
        assert layers.head is net.head, arch
    with pytest.raises(ValueError, match="no module 'nope'"):
        locate_cam_layers(net, images, layer="nope")


def test_grad_cam_works_on_a_frozen_classifier():
    """Training and eval.py hand CIIDefence a FrozenClassifier (no parameter requires grad) and a
    detached input: Grad-CAM must still differentiate the scores with respect to the feature map."""
    detector = RedDetector("max").eval()  # a max-pooling head: Grad-CAM, not CAM
    frozen = FrozenClassifier(RedDetector("max"), mean=[0.0] * 3, std=[1.0] * 3)
    frozen.net.load_state_dict(detector.state_dict())
    images, centres = planted_red_patches(8)
    layers = locate_cam_layers(frozen, images[:1])
    assert layers.head is None
    maps, _ = class_activation_maps(frozen, images.detach(), 1, layers)
    peaks = peak_coordinates(maps[:, 0], 1, 0)[:, 0].float()
    assert ((peaks - centres).abs() <= 2).all(), (peaks, centres)
    masks = CIIDefence(frozen, top_classes=2, maxima=2, half_width=1).masks(images)
    assert torch.equal(masks, CIIDefence(detector, top_classes=2, maxima=2, half_width=1).masks(images))


class PooledFeatures(nn.Module):
    """Large features (tens) pooled by their spatial mean into a linear head: under bf16 autocast the
    pooled vector carries bf16 rounding (2^-8 relative), far above an fp32 tolerance."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv.weight.normal_(0, 8).add_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def test_a_pooling_head_is_recognised_under_bf16_autocast():
    """On a GPU with bf16-mixed, the CAM head went unrecognised and CIIDefence fell back to Grad-CAM."""
    torch.manual_seed(0)
    model, images = PooledFeatures().eval(), torch.rand(2, 3, 16, 16)
    assert locate_cam_layers(model, images).head is model.head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers = locate_cam_layers(model, images)
        maps, _ = class_activation_maps(model, images, 2, layers)
    assert layers.head is model.head and maps.shape == (2, 2, 16, 16)


def test_peaks_and_masks_have_the_configured_boxes():
    maps = torch.zeros(1, 20, 20)
    maps[0, 5, 5], maps[0, 5, 6], maps[0, 14, 12], maps[0, 0, 19] = 9.0, 8.0, 7.0, 6.0
    peaks = peak_coordinates(maps, 3, radius=4)
    # (5,6) lies within the suppression radius of (5,5); the third peak is the corner one.
    assert peaks[0].tolist() == [[5, 5], [14, 12], [0, 19]]
    mask = box_mask(peaks, half_width=2, size=(20, 20))
    assert mask.shape == (1, 1, 20, 20)
    assert mask[0, 0, 3:8, 3:8].all() and mask[0, 0, 12:17, 10:15].all()
    assert mask.sum() == 25 + 25 + 9  # the corner box is cut at the border: 3 x 3 pixels left
    defense = CIIDefence(RedDetector("mean").eval(), top_classes=2, maxima=3, half_width=2)
    images, _ = planted_red_patches(4)
    masks = defense.masks(images)
    assert masks.shape == (4, 2, 1, 32, 32)
    # nms_radius = 2 * half_width: the three boxes of a class never overlap, so each class masks at
    # most 3 * 5 * 5 pixels, and exactly that where no box touches the border.
    per_class = masks.sum((2, 3, 4))
    assert (per_class <= 75).all() and (per_class >= 3 * 9).all()


@pytest.mark.parametrize("inpainter", [TeleaInpainter(3), InpaintingNetwork(3, 8, 2)], ids=["telea", "network"])
def test_the_inpainters_fill_masked_pixels_only(inpainter):
    torch.manual_seed(0)
    if isinstance(inpainter, InpaintingNetwork):
        nn.init.normal_(inpainter.tail[-1].weight, std=0.1)  # a trained-looking network, not the zero-initialised one
    images = torch.rand(3, 3, 16, 16)
    mask = box_mask(torch.tensor([[[4, 4]], [[8, 10]], [[15, 0]]]), 2, (16, 16))
    filled = inpainter(images, mask)
    outside = mask.expand_as(images) == 0
    assert torch.equal(filled[outside], images[outside])
    assert (filled[~outside] != images[~outside]).float().mean() > 0.9
    assert filled.min() >= 0 and filled.max() <= 1


def test_smooth_fill_is_a_local_mean_of_the_known_pixels():
    image = torch.full((1, 3, 12, 20), 0.25)
    image[..., 10:] = 0.75
    mask = box_mask(torch.tensor([[[5, 2], [5, 17]]]), 1, (12, 20))
    filled = smooth_fill(torch.where(mask > 0, torch.rand_like(image), image), mask)
    # Each hole reads the known pixels within the kernel's reach (4 px), never the hole's old content.
    torch.testing.assert_close(filled[..., 4:7, 1:4], torch.full((1, 3, 3, 3), 0.25))
    torch.testing.assert_close(filled[..., 4:7, 16:19], torch.full((1, 3, 3, 3), 0.75))


@pytest.fixture(scope="module")
def cii_run(shapes_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RestorationCLI]:
    """A few steps of the tiny CII inpainter config against the quick-start victim: the mechanics."""
    root = tmp_path_factory.mktemp("cii")
    cli = RestorationCLI(
        args=restorer_args(CII_CONFIG, shapes_victim, root, "cii", STEPS, "--model.init_args.lr", "0.005")
    )
    return root, cli


def test_a_short_run_on_cifar_inpaints_better_than_telea(cifar_tree: Path, shapes_victim: Path, tmp_path: Path):
    """300 steps of the CIFAR-10 config (a small network, random boxes, restoration loss only) beat
    OpenCV's Telea inside the boxes of held-out images. The victim only has to have 10 classes here."""
    cli = RestorationCLI(
        args=[
            "fit",
            "--config",
            str(REPO_ROOT / "configs" / "cii_cifar10.yaml"),
            *QUIET,
            *run_dirs(tmp_path, "cii_cifar"),
            "--data.init_args.root",
            str(cifar_tree),
            "--model.init_args.classifier",
            str(shapes_victim),
            "--model.init_args.arch",
            "{num_features: 16, num_blocks: 2}",
            "--model.init_args.placement",
            "random",
            "--model.init_args.classifier_weight",
            "0",
            "--model.init_args.adversarial_share",
            "0",
            "--model.init_args.lr",
            "0.005",
            "--model.init_args.val_steps",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--trainer.benchmark",
            "false",
            "--data.init_args.on_device",
            "false",
            "--data.init_args.batch_size",
            "32",
            "--data.init_args.val_images",
            "200",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "300",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 300
    assert metrics["val/psnr"] > metrics["val/psnr_input"] + 0.1, (
        float(metrics["val/psnr"]),
        float(metrics["val/psnr_input"]),
    )


def test_bpda_holds_the_forward_mask_and_differentiates_the_rest(cii_run):
    _, cli = cii_run
    defense = cli.model.defense()
    images, _ = render_shapes(6, seed=4)
    x = (images.float() / 255).requires_grad_(True)
    masks = defense.masks(x)
    weights = torch.randn(6, 3, 32, 32)
    (gradient,) = torch.autograd.grad((defense.bpda(x) * weights).sum(), x)
    (fixed_mask,) = torch.autograd.grad((defense.purify(x, masks, differentiable=True) * weights).sum(), x)
    torch.testing.assert_close(gradient, fixed_mask)
    torch.testing.assert_close(defense.bpda(x), defense(x))  # the learned inpainter: forward = surrogate at x
    assert gradient.abs().sum() > 0


def test_export_and_checkpoint_rebuild_the_defense(cii_run, shapes_victim: Path):
    root, cli = cii_run
    classifier = load_classifier(shapes_victim)
    images, _ = render_shapes(8, seed=9)
    x = images.float() / 255
    expected = cli.model.defense()(x)
    exported = make_defense(str(root / "exports" / "cii.pt"), classifier)
    from_checkpoint = make_defense(str(root / "runs" / "cii" / "checkpoints" / "last.ckpt"), classifier)
    assert exported.spec() == from_checkpoint.spec() and exported.spec()["inpainter"] == "learned"
    ema = module_from_checkpoint(root / "runs" / "cii" / "checkpoints" / "last.ckpt").defense()(x)
    torch.testing.assert_close(exported(x), ema)
    torch.testing.assert_close(from_checkpoint(x), ema)
    assert not torch.equal(expected, x)


def test_telea_config_builds_by_name_and_refuses_other_inpainters(shapes_victim: Path):
    classifier = load_classifier(shapes_victim)
    defense = make_defense(TELEA_CONFIG, classifier)
    assert isinstance(defense, CIIDefence) and isinstance(defense.inpainter, TeleaInpainter)
    assert defense.spec()["sigma"] == 0.1 and defense.nms_radius == 6
    with pytest.raises(ValueError, match="export file"):
        make_defense("cii:inpainter=gan", classifier)


def test_cii_runs_through_eval_with_bpda(cii_run, shapes_victim: Path, tmp_path: Path):
    root, _ = cii_run
    results = evaluator_cli.main(
        [
            "--classifier",
            str(shapes_victim),
            "--data",
            "shapes",
            "--defense",
            "cii:sigma=0.05",
            str(root / "exports" / "cii.pt"),
            "--attacks",
            "pgd10",
            "--threats",
            "none,gray-box,white-box,bpda",
            "--n",
            "40",
            "--sanity-images",
            "20",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(tmp_path / "cii"),
        ]
    )
    rows = {(row["defense"].split("(")[0], row["threat"]): row for row in results["rows"]}
    assert rows[("none", "none")]["accuracy"] <= 0.05
    for name in ("cii",):
        assert {("cii", "clean"), ("cii", "gray-box"), ("cii", "bpda")} <= set(rows), name
    assert any(skip["threat"] == "white-box" and "not differentiable" in skip["reason"] for skip in results["skipped"])
    assert len(results["sanity"]["large_eps_rows"]) == 3
