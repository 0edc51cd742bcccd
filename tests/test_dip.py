from __future__ import annotations

from pathlib import Path

import pytest
import torch

from classifiers import load_classifier
from datamodules import render_shapes
from defenses import DipDefense, make_defense
from defenses.dip import GroupedSkipNetwork, stitch_trajectory
from evaluation import cli as evaluator_cli
from tests.conftest import REPO_ROOT

DIP_CONFIG = str(REPO_ROOT / "configs" / "defenses" / "dip_cifar10.yaml")
TINY = "dip:iterations=60,record_every=10,warmup_records=1,stitch_records=2"


def test_grouped_networks_are_independent_networks():
    """A batch of N networks in grouped convolutions equals N networks run one at a time, forward and
    through an Adam step (the loss is a sum over images, so each network sees only its own).

    In float64, inputs from their own generator: in float32 the two summation orders differ by ~1e-7,
    and Adam's first step (about lr * sign of each gradient) carried that to 3e-5-6e-5 in the output
    for 3 of 30 input draws, so the test failed or passed with whatever the global generator held."""
    make = lambda count, seed: GroupedSkipNetwork(count, 4, 3, (8, 16), 2, torch.Generator().manual_seed(seed)).double()  # noqa: E731
    batched, singles = make(3, 0), [make(1, seed) for seed in (1, 2, 3)]
    with torch.no_grad():
        for index, single in enumerate(singles):
            for mine, theirs in zip(single.parameters(), batched.parameters()):
                mine.copy_(theirs.view(3, -1)[index].view_as(mine))
    inputs = torch.Generator().manual_seed(4)
    noise = torch.rand(3, 4, 16, 16, generator=inputs, dtype=torch.float64)
    targets = torch.rand(3, 3, 16, 16, generator=inputs, dtype=torch.float64)
    torch.testing.assert_close(
        batched(noise), torch.cat([single(noise[i : i + 1]) for i, single in enumerate(singles)])
    )
    optimizers = [torch.optim.Adam(model.parameters(), lr=0.01) for model in (batched, *singles)]
    ((batched(noise) - targets).square().flatten(1).mean(1).sum()).backward()
    for i, single in enumerate(singles):
        (single(noise[i : i + 1]) - targets[i : i + 1]).square().mean().backward()
    for optimizer in optimizers:
        optimizer.step()
    torch.testing.assert_close(
        batched(noise), torch.cat([single(noise[i : i + 1]) for i, single in enumerate(singles)])
    )


def test_dip_fits_a_tiny_image_and_returns_a_valid_one(shapes_victim: Path):
    classifier = load_classifier(shapes_victim)
    images, _ = render_shapes(3, seed=2)
    x = images.float()[:, :, :16, :16] / 255
    defense = DipDefense(classifier, iterations=120, record_every=10, warmup_records=1)
    records, labels, valid = defense.fit(x)
    assert records.shape == (12, 3, 3, 16, 16) and labels.shape == valid.shape == (12, 3)
    errors = (records - x).square().flatten(2).mean(2)  # (records, images)
    assert (errors[-1] < 0.5 * errors[0]).all(), errors
    restored = defense(x)
    assert restored.shape == x.shape and restored.min() >= 0 and restored.max() <= 1
    assert not valid[0].any() and valid[1:].all()  # the warm-up record does not count


def test_psnr_stopping_ends_each_trajectory_and_then_the_fit(shapes_victim: Path):
    images, _ = render_shapes(2, seed=2)
    x = images.float()[:, :, :16, :16] / 255
    defense = DipDefense(
        load_classifier(shapes_victim), iterations=400, record_every=10, warmup_records=1, stop_psnr=18.0
    )
    records, _, valid = defense.fit(x)
    psnr = -10 * torch.log10((records - x).square().flatten(2).mean(2))
    assert len(records) < 40  # every trajectory passed 18 dB (smoothed) before the budget ran out
    counted = valid[1:].long()  # after the one warm-up record: counted up to its stop, never after
    assert (counted.sum(0) >= 1).all() and (counted.cummin(0).values == counted).all()
    stopped_at = counted.sum(0)  # index in records of each image's last counted record
    assert (psnr[stopped_at, torch.arange(2)] > 15).all()


def test_stitching_follows_the_trajectory():
    """A trajectory that keeps its label gives the last record; one that crosses into the input's
    label after holding another gives the on-manifold records and the stepped boundary record."""
    records = torch.arange(6, dtype=torch.float).view(6, 1, 1, 1, 1).expand(6, 2, 1, 1, 1) / 10  # record k = k/10
    x = torch.full((2, 1, 1, 1), 0.9)
    input_labels = torch.tensor([7, 7])
    labels = torch.tensor([[1, 1], [7, 3], [7, 3], [7, 3], [7, 7], [7, 7]])
    valid = torch.ones(6, 2, dtype=torch.bool)
    valid[0] = False
    out = stitch_trajectory(records, labels, valid, x, input_labels, min_run=2, stitch_records=2, step_away=0.5)
    assert out[0].item() == pytest.approx(0.5)  # image 0 settled on 7 at its first valid record: no crossing
    # image 1 held 3 at records 1..3 and crossed at 4: records 2 and 3, record 3 stepped away from x.
    assert out[1].item() == pytest.approx((0.2 + (0.3 + 0.5 * (0.3 - 0.9))) / 2)
    held_once = stitch_trajectory(records, labels, valid, x, input_labels, min_run=4, stitch_records=2, step_away=0.5)
    assert held_once[1].item() == pytest.approx(0.5)  # 3 held three records, fewer than min_run: last record


def test_dip_draws_are_seeded(shapes_victim: Path):
    classifier = load_classifier(shapes_victim)
    defense = make_defense(TINY, classifier)
    images, _ = render_shapes(2, seed=3)
    x = images.float() / 255
    defense.reseed(1)
    first = defense(x)
    defense.reseed(1)
    assert torch.equal(defense(x), first)
    assert not torch.equal(defense(x), first)  # the next call continues the stream: a fresh draw


def test_the_config_builds_the_defense(shapes_victim: Path):
    defense = make_defense(DIP_CONFIG, load_classifier(shapes_victim))
    assert isinstance(defense, DipDefense) and defense.randomized and not defense.differentiable
    assert defense.spec()["widths"] == [16, 32] and defense.iterations == 300
    with pytest.raises(ValueError, match="at least one record after the warm-up"):
        DipDefense(defense.classifier, iterations=40, record_every=10, warmup_records=5)


def test_dip_runs_through_eval_with_bpda_and_eot(shapes_victim: Path, tmp_path: Path):
    results = evaluator_cli.main(
        [
            "--classifier",
            str(shapes_victim),
            "--data",
            "shapes",
            "--defense",
            TINY,
            "--attacks",
            "pgd3",
            "--threats",
            "gray-box,bpda",
            "--n",
            "10",
            "--eot",
            "2",
            "--eval-draws",
            "1",
            "--sanity-images",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(tmp_path / "dip"),
        ]
    )
    rows = {(row["defense"].split("(")[0], row["threat"]): row for row in results["rows"]}
    assert {("dip", "clean"), ("dip", "gray-box"), ("dip", "bpda")} <= set(rows)
    assert rows[("dip", "bpda")]["eot"] == 2 and rows[("dip", "gray-box")]["eot"] == 1
    assert "the large-budget sanity attacks were skipped (--sanity-images 0)" in results["warnings"]
