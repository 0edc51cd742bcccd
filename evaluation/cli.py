"""eval.py's command line and the run behind it: the class-balanced test subset, the classifier and
the defenses on the device, every threat x attack x epsilon row (evaluation/runner.py), the
large-budget sanity attacks and the zero-gradient check, and the results files (evaluation/report.py).

`main(argv)` is what `python eval.py ...` runs; tests and scripts call it with the same arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from attacks.registry import RECIPES, parse_attack
from classifiers import load_classifier
from classifiers.frozen import misfit
from datamodules import data_module_class, data_set_names
from datamodules.subset import balanced_indices
from defenses import Defense, make_defenses
from engine.errors import InputError, reported_as_one_line
from engine.export import atomic_write_bytes, device_name, environment_meta, file_sha256
from evaluation.journal import FOLDER, RowJournal
from evaluation.report import RESULTS_FORMAT, example_png, pick_example_row, sanity_warnings, worst_case, write_results
from evaluation.runner import (
    AutocastModel,
    Evaluator,
    Row,
    RowSource,
    Skipped,
    parse_eps,
    run_rows,
    sanity_rows,
    zero_gradient_shares,
)
from evaluation.subset import index_record, read_index_record
from evaluation.threats import THREATS, parse_threats

SANITY_IMAGES = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="eval.py",
        description="The shared evaluator: any defense, any classifier, every threat model, one command.",
    )
    parser.add_argument(
        "--classifier", required=True, help="victim: an export (.pt) or a VictimModule checkpoint (.ckpt)"
    )
    parser.add_argument(
        "--defense",
        nargs="+",
        default=["identity"],
        help="defense specs (e.g. jpeg:quality=75) or exported restorer files",
    )
    parser.add_argument("--data", default="shapes", choices=data_set_names(), help="test set (datamodules/registry.py)")
    parser.add_argument("--data-root", help="the data set's folder (not for shapes)")
    parser.add_argument(
        "--attacks",
        default="fgsm,pgd20,pgd100r5",
        help=f"comma list; families {sorted(RECIPES)} + optional step count (+ rN restarts for pgd); the "
        "default's pgd100r5 (100 steps, 5 restarts, best iterate) is the strong adaptive attack beside PGD-20",
    )
    parser.add_argument("--threats", default="none,gray-box,white-box,bpda", help=f"comma list of {list(THREATS)}")
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument(
        "--eps", default="8/255", help="comma list of budgets, fractions allowed (e.g. 2/255,4/255,8/255)"
    )
    parser.add_argument("--n", type=int, default=1000, help="images, class-balanced")
    parser.add_argument("--indices", help="a stored indices.json to evaluate on instead of drawing one from --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transfer-from", help="source classifier for the transfer threat model")
    parser.add_argument("--eot", type=int, default=20, help="gradient draws per step against randomized defenses")
    parser.add_argument(
        "--eval-draws", type=int, default=5, help="evaluations averaged per image for randomized defenses"
    )
    parser.add_argument(
        "--sanity-images",
        type=int,
        default=SANITY_IMAGES,
        help="images of the large-budget sanity attacks (0 skips them, and the results say so); "
        "costly defenses want fewer",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--precision",
        default="32",
        choices=["32", "bf16"],
        help="forward precision of the classifier and of the defenses' networks (attack losses stay fp32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the classifier and the defenses' networks (pays off on a GPU, for long runs)",
    )
    parser.add_argument("--out", required=True, help="results folder; refused if it holds files unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run: the same command again, with --resume; the rows and batches it "
        "finished (kept in <out>/rows/) are read back, the others computed",
    )
    parser.add_argument(
        "--journal-batch-seconds",
        type=float,
        default=30.0,
        help="keep every attacked batch that took at least this many seconds (in <out>/rows/batches/<row>/, until "
        "its row is kept), so that --resume continues a long row from its last batch; 0 keeps every batch",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if (
        args.eot < 1
        or args.eval_draws < 1
        or args.batch_size < 1
        or args.sanity_images < 0
        or args.journal_batch_seconds < 0
    ):
        parser.error(
            "--eot, --eval-draws and --batch-size must be >= 1, --sanity-images and --journal-batch-seconds >= 0"
        )
    return args


def prepare_out(out: Path, overwrite: bool, resume: bool = False) -> Path:
    """`out` once checked; it is made by the first file written into it, after the inputs have loaded,
    so a command refused for its inputs leaves no folder behind."""
    if out.exists() and any(out.iterdir()) and not overwrite and not resume:
        raise SystemExit(
            f"error: '{out}' already holds results; choose another --out, pass --overwrite to replace them, "
            "or --resume to finish the interrupted run that wrote them"
        )
    return out


def resolve_device(text: str) -> torch.device:
    """'auto' -> CUDA when there is one, else the CPU; anything else as torch names it ('cpu', 'cuda:1')."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if text == "auto" else text)


def load_subset(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, dict[str, Any], int]:
    """(images (n,C,H,W) float in [0,1] on device, labels (n,), the index record, the data set's class
    count): the data module's test split, the class-balanced subset drawn as the data modules draw
    theirs, converted as batches are."""
    data_module = data_module_class(args.data)
    if args.data_root and "root" not in inspect.signature(data_module).parameters:
        raise SystemExit(f"error: --data {args.data} is drawn in memory; drop --data-root")
    module = data_module(**({"root": args.data_root} if args.data_root else {}))
    split = module.load_split("test")
    if args.indices:
        indices = read_index_record(args.indices, args.data, len(split.labels))
    else:
        indices = balanced_indices(split.labels, args.n, args.seed)
    images, labels = split.batch(indices)
    return images.to(device), labels.to(device), index_record(args.data, indices, args.seed), module.num_classes


def for_speed(model: nn.Module, device: torch.device, precision: str, compile_model: bool) -> nn.Module:
    """`model` on `device` with its convolutions in channels_last (NHWC: the layout tensor cores want,
    and 20-30% faster on the CPU here too; docs/RESULTS.md), its forward under bf16 autocast with fp32
    outputs when precision is "bf16", and compiled by torch.compile when asked."""
    model = model.to(device, memory_format=torch.channels_last)
    if precision == "bf16":
        model = AutocastModel(model, torch.bfloat16)
    return torch.compile(model) if compile_model else model


def load_models(
    args: argparse.Namespace, device: torch.device, images: Tensor, num_classes: int
) -> tuple[nn.Module, nn.Module | None, list[Defense]]:
    """The classifier, the transfer source (or None) and the defenses, on `device`, in eval mode, each
    network made fast as --precision and --compile say (`for_speed`); each classifier checked on one
    image of the data (channels, size) for the data set's `num_classes`."""

    def checked(path: str) -> nn.Module:
        classifier = load_classifier(path)
        problem = misfit(classifier, tuple(images.shape[1:]), num_classes)
        if problem is not None:
            raise InputError(
                f"the classifier '{path}' does not fit the images of --data {args.data}: {problem}; "
                "pass a classifier trained on this data set"
            )
        return for_speed(classifier, device, args.precision, args.compile)

    classifier = checked(args.classifier)
    source = checked(args.transfer_from) if args.transfer_from else None
    defenses = [defense.to(device).eval() for defense in make_defenses(args.defense, classifier)]
    for defense in defenses:
        if isinstance(getattr(defense, "network", None), nn.Module):  # a restorer's defense, denoised smoothing
            defense.network = for_speed(defense.network, device, args.precision, args.compile)
    return classifier, source, defenses


def load_inputs(
    args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, Tensor, dict[str, Any], tuple[nn.Module, nn.Module | None, list[Defense]]]:
    """load_subset and load_models, with the command's bad input (a missing file, a classifier that does
    not fit the data, a misspelt defense, an export of the wrong kind, an unreadable image) as one
    `error:` line that names it, no traceback."""
    with reported_as_one_line((ValueError, FileNotFoundError)):  # InputError, and settings data or defenses refused
        images, labels, record, num_classes = load_subset(args, device)
        return images, labels, record, load_models(args, device, images, num_classes)


def run_meta(
    script: str,
    argv: list[str] | None,
    environment: dict[str, str],
    device: torch.device,
    args: argparse.Namespace,
    record: dict[str, Any],
) -> dict[str, Any]:
    """What every results file of eval.py and certify.py records first: the command, the date, the code,
    the device, the classifier and the images (data set, count, seed and the index list's hash)."""
    return {
        "command": " ".join(["python", script, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **environment,
        "device": device_name(device),
        "classifier": args.classifier,
        "classifier_sha256": file_sha256(args.classifier)[:16],
        "data": args.data,
        "data_root": args.data_root,
        "n": len(record["indices"]),
        "seed": args.seed,
        "index_hash": record["hash"],
    }


def fingerprint(
    args: argparse.Namespace, environment: dict[str, str], device: torch.device, record: dict[str, Any]
) -> dict[str, Any]:
    """What a row's numbers depend on: the arguments (not where the results go or how they are shown),
    the code, the device and the images."""
    arguments = {
        key: value
        for key, value in vars(args).items()
        if key not in ("out", "overwrite", "resume", "no_progress", "journal_batch_seconds")
    }
    return {**arguments, "commit": environment["commit"], "device": device_name(device), "index_hash": record["hash"]}


def advancing(journal: RowJournal, evaluator: Evaluator) -> RowSource:
    """journal.row that also moves the evaluator's bar past a row it reads back (a computed row moves
    it batch by batch), so that a resumed run's bar ends at its total."""

    def rows_from(key: tuple, compute: Callable[[], Row | Skipped]) -> Row | Skipped:
        loaded = journal.loaded
        result = journal.row(key, compute)
        if journal.loaded > loaded:
            evaluator.row_done_elsewhere()
        return result

    return rows_from


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    environment = environment_meta()  # the commit of the code that runs, read before HEAD can move
    out = prepare_out(Path(args.out), args.overwrite, args.resume)
    device = resolve_device(args.device)
    threats = parse_threats(args.threats)
    attacks = [name.strip() for name in args.attacks.split(",") if name.strip()]
    for name in attacks:
        parse_attack(name)  # fail on a typo now, not after an hour of attacks
    budgets = [parse_eps(text) for text in args.eps.split(",")]
    images, labels, record, (classifier, source, defenses) = load_inputs(args, device)
    with reported_as_one_line():  # before anything is written: a refused --resume leaves the folder as it found it
        journal = RowJournal(
            out / FOLDER, fingerprint(args, environment, device, record), args.resume, args.journal_batch_seconds
        )
    atomic_write_bytes(json.dumps(record).encode(), out / "indices.json")

    progress = tqdm(total=0, unit="batch", miniters=1, disable=args.no_progress, file=sys.stderr, desc="eval")
    evaluator = Evaluator(
        classifier,
        images,
        labels,
        seed=args.seed,
        batch_size=args.batch_size,
        eval_draws=args.eval_draws,
        eot=args.eot,
        source=source,
        progress=progress,
        batches=journal.batches.batch,
    )
    rows_per_attack = sum(len(defenses) if threat.defended else 1 for threat in threats)
    progress.total = evaluator.batches_per_row * (1 + len(defenses) + rows_per_attack * len(attacks) * len(budgets))
    rows_from = advancing(journal, evaluator)
    rows, skipped = run_rows(evaluator, defenses, threats, attacks, args.norm, budgets, rows_from)
    progress.close()
    large_eps = sanity_rows(evaluator, defenses, args.norm, args.sanity_images, journal.row)
    zero_gradients = zero_gradient_shares(evaluator, defenses, threats)

    results = {
        "format": RESULTS_FORMAT,
        "version": 2,  # 2: meta.defenses holds {label, argument, spec} (labels unique within a run)
        "meta": {
            **run_meta("eval.py", argv, environment, device, args, record),
            "transfer_from": args.transfer_from,
            "norm": args.norm,
            "eot": args.eot,
            "eval_draws": args.eval_draws,
            "precision": args.precision,
            "compile": args.compile,
            "batch_size": args.batch_size,
            "sanity_images": args.sanity_images,
            "rows_read_back": journal.loaded,  # finished by an interrupted run that --resume continued
            "batches_read_back": journal.batches.loaded,
            "defenses": [
                {"label": defense.label, "argument": text, "spec": defense.spec()}
                for text, defense in zip(args.defense, defenses)
            ],
        },
        "threat_models": {name: threat.description for name, threat in THREATS.items()},
        "rows": [row.record() for row in rows],
        "worst_case": worst_case(rows, args.data, Path(args.classifier).stem),
        "sanity": {"large_eps_rows": [row.record() for row in large_eps], "zero_gradient_share": zero_gradients},
        "warnings": sanity_warnings(rows, large_eps, zero_gradients)
        + (["the large-budget sanity attacks were skipped (--sanity-images 0)"] if not args.sanity_images else []),
        "skipped": [dataclasses.asdict(item) for item in skipped],
    }
    example = pick_example_row(rows)
    if example is not None:
        results["examples"] = {key: getattr(example, key) for key in ("defense", "threat", "attack", "eps_label")}
    write_results(out, results, rows, example_png(evaluator, example, defenses) if example else None)
    print((out / "results.md").read_text())
    return results
