"""The full-scale CIFAR-10 table in one command (issue 13).

    python scripts/reproduce_cifar10.py                  # one GPU, the configs' sizes: hours
    python scripts/reproduce_cifar10.py --smoke          # the same stages at toy sizes on the CPU, minutes

Stages, each a `train.py` or `eval.py` process as a user would run it, with its log in
<out>/logs/ and its wall time printed and kept in <out>/stages.json:
1. data: the CIFAR-10 JPEG tree at --data-root, extracted from --tarball when missing;
2. victim: configs/victim_cifar10.yaml;
3. sr, rain, trn, cii: configs/<name>_cifar10.yaml, each against that victim;
4. eval: one eval.py over the four restorers, the input-transformation baselines and the
   training-free defenses (CIIDefence with Telea, the deep image prior): PGD-20 (smoke: PGD-5) at
   Linf 8/255 under none, gray-box, white-box and bpda on --n class-balanced test images; randomized defenses
   get EOT and several scoring draws; white-box is skipped (with the reason) where a defense is
   not differentiable, so each defense meets its adaptive threat model;
5. autoattack: the two defenses with the highest robust accuracy under their adaptive threat model
   in stage 4, attacked by AutoAttack under it (its `rand` version for randomized ones), same images;
6. table: <out>/table.md and table.json, the table docs/RESULTS.md quotes.

A rerun continues: a stage whose output exists is skipped (saying so), and a fit that was
interrupted resumes from its last.ckpt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from engine.export import PROJECT_ROOT, atomic_write_bytes

RESTORERS = ("sr", "rain", "trn", "cii")
BASELINES = (
    "jpeg:quality=75",
    "median:kernel=3",
    "bicubic:factor=2",
    "wavelet",
    "bit_depth:bits=4",
    "srd",
    "random_resize_pad:max_pad=4",
)
TRAINING_FREE = (
    "configs/defenses/cii_telea_cifar10.yaml",
    "configs/defenses/dip_cifar10.yaml",
)  # CIIDefence-Telea, DIP
TARBALLS = (
    PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz",
    PROJECT_ROOT / ".data" / "cifar10-jpg.tar.gz",
)


class Sizes:
    """The knobs that differ between the full run and the smoke run; every stage runs the same code."""

    def __init__(self, smoke: bool, n: int, eot: int, eval_draws: int) -> None:
        self.smoke = smoke
        self.n = n
        self.eot = eot
        self.eval_draws = eval_draws
        self.attack = "pgd5" if smoke else "pgd20"

    def train(self, stage: str) -> list[str]:
        if not self.smoke:
            return []
        model = {
            "victim": ["--model.init_args.arch_kwargs", "{width: 8}"],
            "sr": ["--model.init_args.arch_kwargs", "{bicubic_skip: true, num_blocks: 2, num_features: 16}"],
            "rain": ["--model.init_args.arch_kwargs", "{num_blocks: 2, num_features: 16}"],
            "trn": [
                "--model.init_args.arch",
                "{num_features: 16, image_blocks: 1, gradient_blocks: 1, fusion_blocks: 1, reduction: 4}",
            ],
            "cii": ["--model.init_args.arch", "{num_features: 8, num_blocks: 2}"],
        }[stage]
        return [
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--data.init_args.on_device",
            "false",
            # One validation batch: val_images, since the command line's `--trainer.limit_val_batches 1` arrives
            # as the float 1.0, which Lightning reads as 100% of the batches.
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--data.init_args.val_images",
            "50",
            "--trainer.num_sanity_val_steps",
            "0",
            "--data.init_args.batch_size",
            "32",
            "--data.init_args.eval_batch_size",
            "50",
            "--trainer.enable_progress_bar",
            "false",
            *model,
        ]

    def dip(self) -> str:
        return "dip:iterations=10,record_every=5,warmup_records=1" if self.smoke else TRAINING_FREE[1]

    def evaluation(self) -> list[str]:
        common = ["--n", str(self.n), "--eot", str(self.eot), "--eval-draws", str(self.eval_draws), "--no-progress"]
        return common + (["--device", "cpu", "--sanity-images", "0", "--batch-size", "50"] if self.smoke else [])


def run_stage(name: str, command: list[str], out: Path, stages: dict[str, Any]) -> None:
    """Run one stage's process from the project root, its output in <out>/logs/<name>.log; record its time."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as stream:
        finished = subprocess.run([sys.executable, *command], cwd=PROJECT_ROOT, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(
            f"stage '{name}' failed (exit {finished.returncode}) after {seconds:.0f} s; its log {log} ends:\n{tail}"
        )
    stages[name] = {"seconds": round(seconds, 1), "command": " ".join(["python", *command]), "log": str(log)}
    print(f"[{name}] done in {seconds:.1f} s", flush=True)
    _save_stages(out, stages)


def _save_stages(out: Path, stages: dict[str, Any]) -> None:
    atomic_write_bytes(json.dumps(stages, indent=1).encode(), out / "stages.json")


def prepare_data(root: Path, tarball: Path | None, out: Path, stages: dict[str, Any]) -> None:
    """The JPEG tree at root, extracted from the tarball when root has none (a timed stage)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        print(f"[data] {root} holds the tree: skipped", flush=True)
        return
    found = tarball if tarball is not None else next((path for path in TARBALLS if path.is_file()), None)
    if found is None or not found.is_file():
        raise SystemExit(
            f"no CIFAR-10 tree at '{root}' and no tarball to extract it from (tried {[str(p) for p in TARBALLS]}); "
            "pass --data-root to an extracted tree or --tarball to cifar10-jpg.tar.gz"
        )
    print(f"[data] extracting {found} into {root}", flush=True)
    started = time.perf_counter()
    partial = root.with_name(root.name + ".extracting")  # an interrupted extraction never passes for the tree
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(found) as archive:
        archive.extractall(partial, filter="data")
    root.mkdir(parents=True, exist_ok=True)
    for split in ("test", "train"):  # train last: the tree counts as present once both are there
        shutil.rmtree(root / split, ignore_errors=True)
        (partial / split).rename(root / split)
    shutil.rmtree(partial)
    stages["data"] = {"seconds": round(time.perf_counter() - started, 1), "command": f"extract {found} into {root}"}
    print(f"[data] done in {stages['data']['seconds']} s", flush=True)
    _save_stages(out, stages)


def train(stage: str, out: Path, data_root: Path, victim: Path | None, sizes: Sizes, stages: dict[str, Any]) -> Path:
    """Fit configs/<stage>_cifar10.yaml (resuming an interrupted fit); its export path."""
    name = f"{stage}_cifar10"
    export, last = out / "exports" / f"{name}.pt", out / "runs" / name / "checkpoints" / "last.ckpt"
    if export.is_file():
        print(f"[{stage}] {export} exists: skipped", flush=True)
        return export
    command = [
        "train.py",
        "fit",
        "--config",
        f"configs/{name}.yaml",
        "--run.name",
        name,
        "--run.root",
        str(out / "runs"),
        "--run.export_dir",
        str(out / "exports"),
        "--data.init_args.root",
        str(data_root),
        *sizes.train(stage),
    ]
    if victim is not None:
        command += ["--model.init_args.classifier", str(victim)]
    if last.is_file():
        command += ["--ckpt_path", "last"]
    run_stage(stage, command, out, stages)
    return export


def evaluate(stage: str, out: Path, arguments: list[str], stages: dict[str, Any]) -> dict[str, Any]:
    """One eval.py run into <out>/<stage>/ (skipped when its results exist); its results.json."""
    results = out / stage / "results.json"
    if not results.is_file():
        run_stage(stage, ["eval.py", *arguments, "--out", str(out / stage), "--overwrite"], out, stages)
    else:
        print(f"[{stage}] {results} exists: skipped", flush=True)
    return json.loads(results.read_text())


def adaptive_threats(results: dict[str, Any]) -> dict[str, str]:
    """Defense label -> its adaptive threat model: white-box where it is differentiable (eval.py ran
    white-box rows), else bpda. A differentiable defense's BPDA rows (identity surrogate) are weaker."""
    labels = {row["defense"] for row in results["rows"]} - {"none"}
    white_box = {row["defense"] for row in results["rows"] if row["threat"] == "white-box"}
    return {label: "white-box" if label in white_box else "bpda" for label in labels}


def adaptive_ranking(results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(defense label, adaptive threat, robust accuracy) for every defense, most robust first."""
    threats = adaptive_threats(results)
    ranked = [
        (case["name"], case["threat"], float(case["robust_acc"]))
        for case in results["worst_case"]
        if threats.get(case["name"]) == case["threat"]
    ]
    return sorted(ranked, key=lambda item: -item[2])


def table(
    evaluation: dict[str, Any],
    autoattack: dict[str, dict[str, Any]],
    exports: dict[str, Path],
    stages: dict[str, Any],
    attack: str,
) -> dict[str, Any]:
    """One row per defense: clean, gray-box `attack`, adaptive `attack` (its threat model named),
    and AutoAttack where it ran."""
    rows: dict[str, dict[str, Any]] = {}
    threats = adaptive_threats(evaluation)
    for row in evaluation["rows"]:
        entry = rows.setdefault(row["defense"], {"defense": row["defense"]})
        accuracy = {
            "accuracy": round(100 * row["accuracy"], 2),
            "std": round(100 * row["accuracy_std"], 2),
            "draws": row["draws"],
        }
        if row["attack"] == "clean":
            entry["clean"] = accuracy
        elif row["threat"] in ("gray-box", "none"):
            entry[row["threat"]] = accuracy
        elif row["threat"] == threats.get(row["defense"]):
            entry["adaptive"] = {**accuracy, "threat": row["threat"], "eot": row["eot"]}
    for label, results in autoattack.items():
        (case,) = [case for case in results["worst_case"] if case["name"] == label]
        rows[label]["autoattack"] = {"accuracy": float(case["robust_acc"]), "threat": case["threat"]}
    meta = evaluation["meta"]
    training = {
        stage: {
            key: value for key, value in _load_export_meta(path).get("metrics", {}).items() if key.startswith("val/")
        }
        for stage, path in exports.items()
    }
    return {
        "meta": {
            key: meta[key] for key in ("commit", "device", "date", "n", "index_hash", "eot", "eval_draws", "norm")
        },
        "attack": attack,
        "eps": "8/255",
        "rows": list(rows.values()),
        "training": training,
        "stages": stages,
    }


def _load_export_meta(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    spread = f" ± {entry['std']:.2f}" if entry.get("draws", 1) > 1 else ""
    return f"{entry['accuracy']:.2f}{spread}"


def markdown(summary: dict[str, Any]) -> str:
    meta = summary["meta"]
    lines = [
        f"# CIFAR-10, Linf {summary['eps']}, {meta['n']} class-balanced test images (index hash {meta['index_hash']})",
        "",
        f"Commit {meta['commit']}, {meta['device']}, {meta['date']}. Accuracy in %; randomized defenses: mean ± std "
        "over "
        f"{meta['eval_draws']} draws, attacked with EOT {meta['eot']}.",
        "",
        f"| defense | clean | gray-box {summary['attack']} | adaptive {summary['attack']} | adaptive threat | "
        "AutoAttack (adaptive) |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        adaptive = row.get("adaptive") or row.get("none")
        threat = row["adaptive"]["threat"] if "adaptive" in row else ("none" if "none" in row else "-")
        autoattack = f"{row['autoattack']['accuracy']:.2f}" if "autoattack" in row else "-"
        lines.append(
            f"| {row['defense']} | {_cell(row.get('clean'))} | {_cell(row.get('gray-box'))} | {_cell(adaptive)} | "
            f"{threat} | {autoattack} |"
        )
    lines += ["", "| stage | seconds |", "|---|---|"] + [
        f"| {name} | {stage['seconds']} |" for name, stage in summary["stages"].items()
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="results/reproduce_cifar10", help="runs, exports, evaluations, logs and the table"
    )
    parser.add_argument(
        "--data-root", default="data/cifar10", help="the CIFAR-10 JPEG tree (train/<class>/, test/<class>/)"
    )
    parser.add_argument("--tarball", type=Path, help="cifar10-jpg.tar.gz to extract when --data-root has no tree")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: the same stages in minutes")
    parser.add_argument("--n", type=int, help="evaluation images (default 1000; smoke 20)")
    parser.add_argument("--eot", type=int, help="EOT draws against randomized defenses (default 20; smoke 2)")
    parser.add_argument("--eval-draws", type=int, help="scoring draws of randomized defenses (default 5; smoke 1)")
    args = parser.parse_args(argv)
    defaults = {"n": 20, "eot": 2, "eval_draws": 1} if args.smoke else {"n": 1000, "eot": 20, "eval_draws": 5}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out, data_root = Path(args.out).resolve(), Path(args.data_root).resolve()
    sizes = Sizes(args.smoke, args.n, args.eot, args.eval_draws)
    stages: dict[str, Any] = json.loads((out / "stages.json").read_text()) if (out / "stages.json").is_file() else {}
    started = time.perf_counter()
    prepare_data(data_root, args.tarball, out, stages)
    victim = train("victim", out, data_root, None, sizes, stages)
    exports = {stage: train(stage, out, data_root, victim, sizes, stages) for stage in RESTORERS}

    defenses = [*BASELINES, TRAINING_FREE[0], sizes.dip(), *(str(path) for path in exports.values())]
    common = ["--classifier", str(victim), "--data", "cifar10", "--data-root", str(data_root), *sizes.evaluation()]
    evaluation = evaluate(
        "eval",
        out,
        [
            *common,
            "--defense",
            *defenses,
            "--attacks",
            sizes.attack,
            "--threats",
            "none,gray-box,white-box,bpda",
            "--eps",
            "8/255",
        ],
        stages,
    )
    labels = {defense["label"]: defense["argument"] for defense in evaluation["meta"]["defenses"]}
    autoattack = {}
    for rank, (label, threat, _) in enumerate(adaptive_ranking(evaluation)[:2]):
        autoattack[label] = evaluate(
            f"autoattack{rank + 1}",
            out,
            [
                *common,
                "--defense",
                labels[label],
                "--attacks",
                "autoattack",
                "--threats",
                threat,
                "--eps",
                "8/255",
                "--indices",
                str(out / "eval" / "indices.json"),
            ],
            stages,
        )
    stages["total"] = {"seconds": round(sum(stage["seconds"] for name, stage in stages.items() if name != "total"), 1)}
    print(
        f"[all] this invocation took {time.perf_counter() - started:.1f} s; the stages {stages['total']['seconds']} "
        "s in all",
        flush=True,
    )
    summary = table(evaluation, autoattack, {"victim": victim, **exports}, stages, sizes.attack)
    atomic_write_bytes(json.dumps(summary, indent=1).encode(), out / "table.json")
    atomic_write_bytes(markdown(summary).encode(), out / "table.md")
    print((out / "table.md").read_text())
    return summary
