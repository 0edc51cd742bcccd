"""The shared evaluator: any defense, any classifier, every threat model, one command.

    python eval.py --classifier checkpoints/victim_shapes.pt --data shapes \\
        --defense jpeg:quality=75 median:kernel=3 bit_depth:bits=4 \\
        --attacks fgsm,pgd20 --threats none,gray-box,white-box,bpda --n 500 --out results/shapes_baselines

Images come from a class-balanced index list drawn from --seed (or read with --indices), stored
as indices.json beside the results with its hash. For each defense, threat model, attack and
epsilon it writes one row; then the per-image worst case over attacks per threat model, the
sanity checks (undefended accuracy at a large epsilon must be ~0; warnings on signs of gradient
masking), and results.json, results.csv, results.md, eps_accuracy.png and examples.png to --out,
which must not hold results already unless --overwrite is given. See evaluation/threats.py for
what each threat model means and attacks/registry.py for the attack names.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from attacks.registry import RECIPES, parse_attack
from classifiers import load_classifier
from datamodules import CIFAR10, STL10, SVHN, FashionMNIST, ImageFolderTensors, Shapes, TensorImageDataModule
from defenses import Defense, Identity, describe, make_defense
from engine.export import atomic_write_bytes, environment_meta, file_sha256
from evaluation.report import RESULTS_FORMAT, example_grid, parse_eps, sanity_warnings, worst_case, write_results
from evaluation.runner import AutocastLogits, Evaluator, Row, Skipped
from evaluation.subset import balanced_indices, index_record, read_index_record
from evaluation.threats import THREATS, ThreatModel, parse_threats

DATASETS: dict[str, type[TensorImageDataModule]] = {
    "shapes": Shapes, "cifar10": CIFAR10, "svhn": SVHN, "fashion_mnist": FashionMNIST, "stl10": STL10, "folder": ImageFolderTensors,
}
SANITY_IMAGES = 200
SANITY_EPS = {"linf": "32/255", "l2": "4"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="victim: an export (.pt) or a VictimModule checkpoint (.ckpt)")
    parser.add_argument("--defense", nargs="+", default=["identity"], help="defense specs (e.g. jpeg:quality=75) or exported restorer files")
    parser.add_argument("--data", default="shapes", choices=sorted(DATASETS), help="test set")
    parser.add_argument("--data-root", help="the data set's folder (not for shapes)")
    parser.add_argument("--attacks", default="fgsm,pgd20", help=f"comma list; families {sorted(RECIPES)} + optional step count")
    parser.add_argument("--threats", default="none,gray-box,white-box,bpda", help=f"comma list of {list(THREATS)}")
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--eps", default="8/255", help="comma list of budgets, fractions allowed (e.g. 2/255,4/255,8/255)")
    parser.add_argument("--n", type=int, default=1000, help="images, class-balanced")
    parser.add_argument("--indices", help="a stored indices.json to evaluate on instead of drawing one from --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transfer-from", help="source classifier for the transfer threat model")
    parser.add_argument("--eot", type=int, default=20, help="gradient draws per step against randomized defenses")
    parser.add_argument("--eval-draws", type=int, default=5, help="evaluations averaged per image for randomized defenses")
    parser.add_argument(
        "--sanity-images", type=int, default=SANITY_IMAGES,
        help="images of the large-budget sanity attacks (0 skips them, and the results say so); costly defenses want fewer",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"], help="classifier forward precision (attack losses stay fp32)")
    parser.add_argument("--out", required=True, help="results folder; refused if it holds files unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.eot < 1 or args.eval_draws < 1 or args.batch_size < 1 or args.sanity_images < 0:
        parser.error("--eot, --eval-draws and --batch-size must be >= 1, --sanity-images >= 0")
    return args


def prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"error: '{out}' already holds results; choose another --out or pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_device(text: str) -> torch.device:
    """'auto' -> CUDA when there is one, else the CPU; anything else as torch names it ('cpu', 'cuda:1')."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if text == "auto" else text)


def load_subset(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(images (n,C,H,W) float in [0,1] on device, labels (n,), the index record)."""
    options = {"root": args.data_root} if args.data_root else {}
    if args.data == "shapes" and args.data_root:
        raise SystemExit("error: --data shapes is drawn in memory; drop --data-root")
    split = DATASETS[args.data](**options).load_split("test")
    if args.indices:
        indices = read_index_record(args.indices, args.data, len(split.labels))
    else:
        indices = balanced_indices(split.labels, args.n, args.seed)
    images = split.images[indices].to(device).float() / 255
    return images, split.labels[indices].to(device), index_record(args.data, indices, args.seed)


def load_models(args: argparse.Namespace, device: torch.device, channels: int) -> tuple[nn.Module, Optional[nn.Module], list[Defense]]:
    """The classifier, the transfer source (or None) and the defenses, on `device`, in eval mode."""
    def classifier_from(path: str) -> nn.Module:
        model = load_classifier(path).to(device)
        return AutocastLogits(model, torch.bfloat16) if args.precision == "bf16" else model

    classifier = classifier_from(args.classifier)
    source = classifier_from(args.transfer_from) if args.transfer_from else None
    defenses = [make_defense(text, classifier).to(device).eval() for text in args.defense]
    probe = torch.zeros(1, channels, 8, 8, device=device)
    try:
        with torch.no_grad():
            classifier(probe)
    except RuntimeError as mismatch:
        raise SystemExit(f"error: the classifier does not take {channels}-channel images of this data set ({mismatch})") from mismatch
    return classifier, source, defenses


def run_rows(
    evaluator: Evaluator, defenses: list[Defense], threats: list[ThreatModel], attacks: list[str], norm: str,
    budgets: list[tuple[float, str]],
) -> tuple[list[Row], list[Skipped]]:
    """Clean rows, then every threat x attack x epsilon; the undefended threat once, not per defense."""
    rows: list[Row] = [evaluator.clean(None)] + [evaluator.clean(defense) for defense in defenses]
    skipped: list[Skipped] = []
    for threat in threats:
        for attack in attacks:
            for eps, label in budgets:
                # Defenses innermost: an attack that never sees the defense is computed once for all.
                for defense in [Identity()] if not threat.defended else defenses:
                    result = evaluator.attack(defense, threat, attack, norm, eps, label)
                    (skipped if isinstance(result, Skipped) else rows).append(result)
    return rows, list(dict.fromkeys(skipped))


def sanity_rows(evaluator: Evaluator, defenses: list[Defense], norm: str, count: int) -> list[Row]:
    """PGD-20 at a large budget on the first `count` images: undefended, and through each defense adaptively."""
    if count == 0:
        return []
    eps, label = parse_eps(SANITY_EPS[norm])
    small = Evaluator(
        evaluator.classifier, evaluator.images[:count], evaluator.labels[:count], seed=evaluator.seed,
        batch_size=evaluator.batch_size, eval_draws=evaluator.eval_draws, eot=evaluator.eot,
    )
    rows = [small.attack(Identity(), THREATS["none"], "pgd20", norm, eps, label)]
    for defense in defenses:
        threat = THREATS["white-box" if defense.differentiable else "bpda"]
        rows.append(small.attack(defense, threat, "pgd20", norm, eps, label))
    return [row for row in rows if isinstance(row, Row)]


def zero_gradient_shares(evaluator: Evaluator, defenses: list[Defense], threats: list[ThreatModel]) -> dict[str, float]:
    shares = {}
    for defense in defenses:
        for threat in threats:
            if threat.through_defense and not threat.queries_only and (defense.differentiable or threat.name == "bpda"):
                shares[f"{describe(defense.spec())} / {threat.name}"] = evaluator.zero_gradient_share(defense, threat)
    return shares


def pick_example_row(rows: list[Row]) -> Optional[Row]:
    """The strongest adaptive attack at the largest budget (else the strongest attack there)."""
    attacked = [row for row in rows if row.attack != "clean" and row.defense != "none"] or [row for row in rows if row.attack != "clean"]
    if not attacked:
        return None
    largest = max(row.eps for row in attacked)
    return min((row for row in attacked if row.eps == largest), key=lambda row: (row.threat not in ("white-box", "bpda"), row.accuracy))


def example_png(evaluator: Evaluator, row: Row, defenses: list[Defense]) -> bytes:
    """clean / adversarial / restored / amplified difference of the row's first images."""
    by_label = {describe(defense.spec()): defense for defense in defenses}
    adversarial = row.examples.to(evaluator.images.device)
    with torch.no_grad():
        restored = by_label[row.defense](adversarial) if row.defense in by_label else adversarial
    clean = evaluator.images[: len(adversarial)]
    return example_grid(clean.cpu(), adversarial.cpu(), restored.cpu(), row.eps)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    environment = environment_meta()  # the commit of the code that runs, read before HEAD can move
    out = prepare_out(Path(args.out), args.overwrite)
    device = resolve_device(args.device)
    threats = parse_threats(args.threats)
    attacks = [name.strip() for name in args.attacks.split(",") if name.strip()]
    for name in attacks:
        parse_attack(name)  # fail on a typo now, not after an hour of attacks
    budgets = [parse_eps(text) for text in args.eps.split(",")]
    images, labels, record = load_subset(args, device)
    classifier, source, defenses = load_models(args, device, images.shape[1])
    atomic_write_bytes(json.dumps(record).encode(), out / "indices.json")

    progress = tqdm(total=0, unit="batch", miniters=1, disable=args.no_progress, file=sys.stderr, desc="eval")
    evaluator = Evaluator(
        classifier, images, labels, seed=args.seed, batch_size=args.batch_size, eval_draws=args.eval_draws,
        eot=args.eot, source=source, progress=progress,
    )
    rows_per_attack = sum(len(defenses) if threat.defended else 1 for threat in threats)
    progress.total = evaluator.batches_per_row * (1 + len(defenses) + rows_per_attack * len(attacks) * len(budgets))
    rows, skipped = run_rows(evaluator, defenses, threats, attacks, args.norm, budgets)
    progress.close()
    large_eps = sanity_rows(evaluator, defenses, args.norm, args.sanity_images)
    zero_gradients = zero_gradient_shares(evaluator, defenses, threats)

    results = {
        "format": RESULTS_FORMAT, "version": 1,
        "meta": {
            "command": " ".join(["python", "eval.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **environment, "device": device_name(device), "classifier": args.classifier,
            "classifier_sha256": file_sha256(args.classifier)[:16], "transfer_from": args.transfer_from,
            "data": args.data, "data_root": args.data_root, "n": len(labels), "seed": args.seed,
            "index_hash": record["hash"], "norm": args.norm, "eot": args.eot, "eval_draws": args.eval_draws,
            "precision": args.precision, "batch_size": args.batch_size, "sanity_images": args.sanity_images,
            "defenses": [defense.spec() for defense in defenses],
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


if __name__ == "__main__":
    main()
