"""Every benchmark of this folder, one after another, each in its own process; their JSON lines are
collected into <out>/benchmarks.jsonl and a table <out>/table.md headed by the device and the commit.

    python benchmarks/run_all.py --out results/benchmarks --classifier checkpoints/victim_cifar10_resnet18.pt \
        --data-root data/cifar10                                     # the sizes of issue 18's table (a GPU)
    python benchmarks/run_all.py --size tiny --out /tmp/benchmarks     # seconds on a CPU: CI keeps them running

`full` measures at the sizes the performance targets are stated in (CIFAR-10, batch 256 to 1,024);
`tiny` runs the same code paths on the embedded shapes with a few small steps, to prove each benchmark
still runs (its figures mean little). Without --classifier, an untrained victim of the size's
architecture is written into <out> (throughput does not depend on the weights; the robust accuracies
of attack_throughput then mean nothing). Benchmarks that need the CIFAR-10 tree (split_loading, and
attack_throughput in `full`) run only with --data-root. A failing benchmark is reported in the table
and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from classifiers import VictimModule
from engine.export import atomic_save, atomic_write_bytes, environment_meta

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

# The untrained victim each size writes when no --classifier is given: VictimModule's arguments.
VICTIMS = {
    "full": {"arch": "resnet18_cifar", "arch_kwargs": {"width": 64}},
    "tiny": {"arch": "small_cnn", "arch_kwargs": {"widths": (4, 4, 8)}},
}
TINY_STEPS = ["--steps", "2", "--warmup", "1"]
TINY_DIP = "dip:iterations=4,record_every=1,warmup_records=1,stitch_records=1"


def restorer_steps(size: str, classifier: str, run_root: str) -> list[tuple[str, list[str]]]:
    """benchmarks/restorer_step.py for SR, RAIN and TRN: their CIFAR-10 configs, or their shapes configs tiny."""
    data = "cifar10" if size == "full" else "shapes"
    sizes = ["--batch", "256"] if size == "full" else ["--batch", "4", *TINY_STEPS]
    overrides = ["--model.init_args.classifier", classifier, "--run.root", run_root]
    return [
        ("restorer_step.py", ["--config", f"configs/{kind}_{data}.yaml", *sizes, *overrides])
        for kind in ("sr", "rain", "trn")
    ]


def plan(size: str, classifier: str, data_root: str | None, out: Path) -> list[tuple[str, list[str]]]:
    """(script, arguments) of every benchmark to run at `size`."""
    run_root, victim = ["--run.root", str(out / "runs")], ["--classifier", classifier]
    cifar = ["--data", "cifar10", "--data-root", str(data_root)]
    if size == "full":
        runs = [
            ("victim_training.py", ["--config", "configs/victim_cifar10.yaml", *run_root]),
            ("sr_throughput.py", [*victim, "--batch", "1024"]),
        ]
        attack = [*cifar, "--n", "10000", "--batch-size", "1000", "--precision", "bf16"] if data_root else None
        dip = [*cifar, "--batch", "100", "--single", "5"] if data_root else None
    else:
        runs = [
            ("victim_training.py", ["--config", "configs/victim_shapes.yaml", "--batch", "8", *TINY_STEPS, *run_root]),
            ("sr_throughput.py", [*victim, "--batch", "4", "--lr-size", "8", *TINY_STEPS]),
        ]
        attack = ["--data", "shapes", "--n", "20", "--batch-size", "10", "--steps", "2"]
        dip = ["--data", "shapes", "--defense", TINY_DIP, "--batch", "2", "--single", "1"]
    runs += restorer_steps(size, classifier, run_root[1])
    runs += [("attack_throughput.py", [*victim, *attack])] if attack else []
    runs += [("dip_throughput.py", [*victim, *dip])] if dip else []
    runs += [("split_loading.py", ["--root", str(data_root), "--split", "test"])] if data_root else []
    return runs


def untrained_victim(size: str, out: Path) -> Path:
    """An untrained victim export of the size's architecture (the benchmarks time it, never score it)."""
    module = VictimModule(**VICTIMS[size], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    return atomic_save(module.to_export({"note": "untrained, for benchmarks/run_all.py"}), out / "victim_untrained.pt")


def run_one(script: str, arguments: list[str]) -> tuple[list[dict[str, Any]], str | None]:
    """Run benchmarks/<script>; (its JSON lines, None) or ([], the end of its error output)."""
    command = [sys.executable, str(HERE / script), *arguments]
    print(f"[run_all] {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return [], (done.stderr.strip().splitlines() or ["no output"])[-1]
    return lines, None


def measurements(line: dict[str, Any]) -> str:
    """The figures of one JSON line: every number after the settings, as key=value."""
    skip = {"benchmark", "device", "commit", "torch", "pytorch_lightning", "python", "batch", "steps", "n"}
    return ", ".join(f"{key}={value}" for key, value in line.items() if key not in skip and isinstance(value, float))


def settings(line: dict[str, Any]) -> str:
    keys = ("config", "preset", "data", "mode", "split", "batch", "batch_size", "steps", "n", "precision", "attack")
    return ", ".join(f"{key}={line[key]}" for key in keys if key in line)


def table(lines: list[dict[str, Any]], failures: list[tuple[str, str]], header: dict[str, Any]) -> str:
    rows = [f"| {line['benchmark']} | {settings(line)} | {measurements(line)} |" for line in lines]
    rows += [f"| {script} | FAILED | {error} |" for script, error in failures]
    return "\n".join(
        [
            f"# Benchmarks ({header['size']})",
            "",
            f"device: {header['device']}; commit {header['commit']}; torch {header['torch']}, "
            f"Lightning {header['pytorch_lightning']}; {header['date']}; {header['seconds']} s in all",
            "",
            "| benchmark | settings | measured |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of benchmarks.jsonl and table.md")
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--classifier", help="a victim export; default: an untrained one written into --out")
    parser.add_argument("--data-root", help="the CIFAR-10 JPEG tree (split_loading; attack_throughput in full)")
    parser.add_argument("--only", help="comma list of benchmark names (e.g. restorer_step,attack_throughput)")
    args = parser.parse_args()
    names = {Path(script).stem for script, _ in plan(args.size, "", args.data_root, Path(args.out))}
    only = set(args.only.split(",")) if args.only else names
    if only - names:
        parser.error(f"--only: no benchmark {sorted(only - names)} at this size; there are {sorted(names)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = args.classifier or str(untrained_victim(args.size, out))
    started, lines, failures = time.perf_counter(), [], []
    for script, arguments in plan(args.size, classifier, args.data_root, out):
        if Path(script).stem not in only:
            continue
        found, error = run_one(script, arguments)
        lines += found
        if error is not None:
            failures.append((script, error))
            print(f"[run_all] {script} FAILED: {error}", flush=True)
    header = {
        "size": args.size,
        "device": lines[0]["device"] if lines else "unknown",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
        **environment_meta(),
    }
    atomic_write_bytes("".join(json.dumps(line) + "\n" for line in lines).encode(), out / "benchmarks.jsonl")
    atomic_write_bytes(table(lines, failures, header).encode(), out / "table.md")
    print((out / "table.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
