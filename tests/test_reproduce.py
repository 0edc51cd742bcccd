from __future__ import annotations

import json
from pathlib import Path

from evaluation.reproduce import BASELINES, RESTORERS, TRAINING_FREE
from tests.conftest import run_script

RANDOMIZED = ("srd", "random_resize_pad", "dip", "rain")


def test_the_cifar10_reproduction_runs_every_stage_at_smoke_size(cifar_tree: Path, tmp_path: Path):
    """scripts/reproduce_cifar10.py --smoke: the full run's stages on real CIFAR-10 at toy sizes, and a
    rerun that skips what is done (a long GPU run that stops loses nothing)."""
    command = [
        "scripts/reproduce_cifar10.py",
        "--smoke",
        "--data-root",
        str(cifar_tree),
        "--out",
        str(tmp_path / "repro"),
    ]
    first = run_script(*command, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((tmp_path / "repro" / "table.json").read_text())
    assert {"victim", *RESTORERS, "eval", "autoattack1", "autoattack2", "total"} <= set(summary["stages"])
    assert all(stage["seconds"] > 0 for stage in summary["stages"].values())
    rows = {row["defense"]: row for row in summary["rows"]}
    assert len(rows) == 1 + len(BASELINES) + len(TRAINING_FREE) + len(RESTORERS)  # the undefended classifier first
    for label, row in rows.items():
        if label == "none":
            continue
        assert {"clean", "gray-box", "adaptive"} <= set(row), label
        assert row["adaptive"]["threat"] == (
            "bpda" if label.startswith(("jpeg", "bit_depth", "cii", "dip")) else "white-box"
        ), label
        assert row["adaptive"]["eot"] == (2 if label.startswith(RANDOMIZED) else 1), label
    attacked = [label for label, row in rows.items() if "autoattack" in row]
    assert len(attacked) == 2 and all(
        rows[label]["autoattack"]["threat"] == rows[label]["adaptive"]["threat"] for label in attacked
    )
    assert set(summary["training"]) == {"victim", *RESTORERS} and "val/psnr" in summary["training"]["sr"]
    assert "| defense | clean | gray-box pgd5 | adaptive pgd5 |" in (tmp_path / "repro" / "table.md").read_text()

    again = run_script(*command, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        again.stdout.count("exists: skipped") == 1 + len(RESTORERS) + 3
    )  # every fit, the evaluation, both AutoAttacks
    assert "holds the tree: skipped" in again.stdout
