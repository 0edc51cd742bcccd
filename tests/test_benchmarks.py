"""benchmarks/run_all.py at its tiny size: every benchmark runs, prints its JSON line with the device
and the commit, and lands in the table; a benchmark that fails is reported, not hidden. The figures
of a tiny run mean nothing and are not checked beyond being positive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.data_files import cifar_subset_tree

BENCHMARKS = sorted(path.stem for path in (REPO_ROOT / "benchmarks").glob("*.py") if path.stem != "run_all")


def run_all(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/run_all.py", "--size", "tiny", "--out", str(out), *extra]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(cifar_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path_factory.mktemp("benchmarks")
    tree = cifar_subset_tree(cifar_tree, root / "cifar10", 1, 5)
    return run_all(root / "out", "--data-root", str(tree)), root / "out"


def test_every_benchmark_runs_and_prints_a_json_line_with_device_and_commit(tiny_run):
    done, out = tiny_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "benchmarks.jsonl").read_text().splitlines()]
    assert {line["benchmark"] for line in lines} == set(BENCHMARKS)
    for line in lines:
        assert line["device"] and line["commit"] and line["torch"], line
        figures = {key: value for key, value in line.items() if key.endswith(("img_per_s", "s_per_image"))}
        assert figures and all(value > 0 for value in figures.values()), line
    assert {"eval_robust_accuracy", "plain_robust_accuracy"} <= set(
        next(line for line in lines if line["benchmark"] == "attack_throughput")
    )


def test_the_table_names_device_and_commit_and_has_a_row_per_measurement(tiny_run):
    done, out = tiny_run
    text = (out / "table.md").read_text()
    lines = (out / "benchmarks.jsonl").read_text().splitlines()
    assert "device: " in text and "commit " in text
    assert text.count("\n| ") - 1 == len(lines)  # one header row, then the measurements
    assert "FAILED" not in text


def test_a_failing_benchmark_is_reported_and_the_status_says_so(tmp_path: Path):
    done = run_all(tmp_path / "out", "--classifier", str(tmp_path / "missing.pt"), "--only", "sr_throughput")
    assert done.returncode == 1
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| sr_throughput.py | FAILED |" in text and "missing.pt" in text
