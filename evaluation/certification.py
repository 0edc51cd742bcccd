"""certify.py's run: the L2 certificate of randomized smoothing (Cohen et al.'s CERTIFY) for each image
behind one or more smoothing defenses, the certified-accuracy-vs-radius curve, and the empirical check
that the certificate holds.

The check attacks each correctly certified image at each checked radius r below its certified radius
with PGD on the smoothed soft classifier (SmoothAdv, Salman et al. 2019: the project's L2 PGD on
defenses.smoothing.SoftSmoothedClassifier), then asks the smoothed classifier again (PREDICT). An
image is flipped when PREDICT returns another class (abstaining is not a flip: the certificate is
about g, and PREDICT abstains where it cannot tell); a flipped certified image means a bug.

Results in eval.py's layout (--out): indices.json, certify.csv (one line per image and defense),
curve.csv, results.json, results.md and curve.png. Every draw is a function of (--seed, the defense,
the image chunk), so the same command gives the same numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from attacks import GradientAttack
from defenses.smoothing import ABSTAIN, GaussianSmoothing, SoftSmoothedClassifier
from engine.export import atomic_write_bytes, environment_meta
from engine.seeding import seeded_generator
from evaluation.cli import load_inputs, prepare_out, resolve_device, run_meta
from evaluation.report import csv_text
from evaluation.runner import text_key

TABLE_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # the radii results.md tabulates (the papers')
RESULTS_FORMAT = "restoration-defense-certification"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="certify.py",
        description="Randomized smoothing's L2 certificate (Cohen et al. 2019) behind smoothing defenses.",
    )
    parser.add_argument("--classifier", required=True, help="victim: an export (.pt) or a VictimModule checkpoint")
    parser.add_argument(
        "--defense",
        nargs="+",
        required=True,
        help="smoothing defenses: a denoiser export (restorers/denoiser.py) or smoothing:sigma=0.25 (no denoiser)",
    )
    parser.add_argument("--data", default="shapes", help="test set (datamodules/registry.py)")
    parser.add_argument("--data-root", help="the data set's folder (not for shapes)")
    parser.add_argument("--n", type=int, default=500, help="images, class-balanced")
    parser.add_argument("--indices", help="a stored indices.json to certify instead of drawing one from --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selection-draws", type=int, default=100, help="n0: noise draws that choose the class")
    parser.add_argument(
        "--estimation-draws", type=int, default=100_000, help="n: noise draws that bound its probability"
    )
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    parser.add_argument("--batch", type=int, default=1000, help="noisy images per forward pass")
    parser.add_argument(
        "--check-radii",
        default="0.25,0.5,0.75,1.0",
        help="L2 radii of the empirical check (comma list; empty skips it)",
    )
    parser.add_argument("--check-steps", type=int, default=20, help="PGD steps of the empirical check")
    parser.add_argument(
        "--check-noise-draws", type=int, default=16, help="noise draws per PGD gradient (SmoothAdv's m)"
    )
    parser.add_argument(
        "--check-prediction-draws", type=int, default=10_000, help="PREDICT's draws on the attacked images"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--precision",
        default="32",
        choices=["32", "bf16"],
        help="forward precision of the classifier and of the denoiser (counts and radii are computed in fp32)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the classifier and the denoiser")
    parser.add_argument("--out", required=True, help="results folder; refused if it holds files unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(transfer_from=None)  # evaluation.cli.load_models reads it
    args = parser.parse_args(argv)
    if min(args.selection_draws, args.estimation_draws, args.batch, args.check_steps, args.check_noise_draws) < 1:
        parser.error("--selection-draws, --estimation-draws, --batch and the --check-* counts must be >= 1")
    if args.check_prediction_draws < 2:
        parser.error("--check-prediction-draws must be >= 2 (PREDICT compares the two top classes)")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    return args


def smoothing_defenses(defenses: list[nn.Module], texts: list[str], batch: int) -> list[tuple[str, GaussianSmoothing]]:
    """(its --defense argument, the defense) for each, a GaussianSmoothing voting `batch` noisy images per
    pass; anything else refused. Results name a defense by its argument: two denoiser exports share a spec."""
    for defense, text in zip(defenses, texts):
        if not isinstance(defense, GaussianSmoothing):
            raise SystemExit(
                f"error: '{text}' is not a smoothing defense; certify.py takes a denoiser export "
                "(python train.py fit --config configs/denoiser_shapes.yaml) or smoothing:sigma=<sigma>"
            )
        defense.batch = batch
    return list(zip(texts, defenses))


def image_chunks(count: int, args: argparse.Namespace) -> list[slice]:
    """Images certified together: as many as one forward pass of the selection draws holds."""
    size = max(1, args.batch // args.selection_draws)
    return [slice(start, start + size) for start in range(0, count, size)]


def certify_defense(
    label: str,
    defense: GaussianSmoothing,
    classifier: nn.Module,
    images: Tensor,
    args: argparse.Namespace,
    progress: tqdm,
) -> tuple[Tensor, Tensor, float]:
    """(prediction (N,) int64 with ABSTAIN, certified radius (N,) float64, seconds) for every image."""
    smoothing = defense.smoothing(classifier)
    predictions, radii, started = [], [], time.perf_counter()
    for index, chunk in enumerate(image_chunks(len(images), args)):
        generator = seeded_generator(images.device, args.seed, text_key("certify", label), index)
        prediction, radius = smoothing.certify(
            images[chunk], args.selection_draws, args.estimation_draws, args.alpha, generator
        )
        predictions.append(prediction)
        radii.append(radius)
        progress.update(len(prediction))
    return torch.cat(predictions), torch.cat(radii), time.perf_counter() - started


def certified_accuracy(correct: Tensor, radius: Tensor, at: float) -> float:
    """Share of images certified correct with a radius of at least `at`."""
    return (correct & (radius >= at)).double().mean().item()


def empirical_check(
    label: str,
    defense: GaussianSmoothing,
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    correct: Tensor,
    radius: Tensor,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Per checked radius r: SmoothAdv PGD at L2 r on the images certified correct beyond r, then
    PREDICT on them; counts of images kept, abstained and flipped (a flip contradicts the certificate)."""
    rows = []
    smoothing = defense.smoothing(classifier)
    for at in [float(text) for text in args.check_radii.split(",") if text.strip()]:
        chosen = torch.nonzero(correct & (radius > at)).squeeze(1).to(images.device)
        kept = abstained = flipped = 0
        per_pass = max(1, args.batch // args.check_noise_draws)
        for start in range(0, len(chosen), per_pass):
            which = chosen[start : start + per_pass]
            generator = seeded_generator(images.device, args.seed, text_key("check", label, at), start)
            soft = SoftSmoothedClassifier(classifier, defense, args.check_noise_draws, generator)
            attack = GradientAttack("l2", at, args.check_steps)
            adversarial = attack(soft, images[which], labels[which], generator)
            prediction = smoothing.predict(adversarial, args.check_prediction_draws, args.alpha, generator)
            kept += int((prediction == labels[which]).sum())
            abstained += int((prediction == ABSTAIN).sum())
            flipped += int(((prediction != labels[which]) & (prediction != ABSTAIN)).sum())
        rows.append({"radius": at, "attacked": len(chosen), "kept": kept, "abstained": abstained, "flipped": flipped})
    return rows


def certify_and_check(
    label: str,
    defense: GaussianSmoothing,
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    indices: list[int],
    args: argparse.Namespace,
    progress: tqdm,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One defense: (a certify.csv line per image, its summary: the table, curve, check and speed)."""
    prediction, radius, seconds = certify_defense(label, defense, classifier, images, args, progress)
    correct = prediction == labels.cpu()
    rows = [
        {
            "defense": label,
            "index": index,
            "label": int(y),
            "prediction": int(p),
            "radius": round(float(r), 6),
            "correct": int(c),
            "abstained": int(p == ABSTAIN),
        }
        for index, y, p, r, c in zip(indices, labels.tolist(), prediction.tolist(), radius, correct)
    ]
    device = images.device
    check = empirical_check(label, defense, classifier, images, labels, correct.to(device), radius.to(device), args)
    forwards = len(labels) * (args.selection_draws + args.estimation_draws)
    summary = {
        "defense": label,
        "spec": defense.spec(),
        "sigma": defense.sigma,
        "certified_accuracy": {str(at): certified_accuracy(correct, radius, at) for at in TABLE_RADII},
        "abstained": (prediction == ABSTAIN).double().mean().item(),
        "seconds": round(seconds, 3),
        "forward_passes_per_s": round(forwards / seconds, 1),
        "empirical_check": check,
        "curve": curve(correct, radius),
    }
    return rows, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    environment = environment_meta()
    out = prepare_out(Path(args.out), args.overwrite)
    device = resolve_device(args.device)
    images, labels, record, (classifier, _, defenses) = load_inputs(args, device)
    defenses = smoothing_defenses(defenses, args.defense, args.batch)
    atomic_write_bytes(json.dumps(record).encode(), out / "indices.json")

    progress = tqdm(total=len(labels) * len(defenses), unit="img", disable=args.no_progress, file=sys.stderr)
    per_image, summaries = [], []
    for label, defense in defenses:
        rows, summary = certify_and_check(label, defense, classifier, images, labels, record["indices"], args, progress)
        per_image += rows
        summaries.append(summary)
    progress.close()
    results = {
        "format": RESULTS_FORMAT,
        "version": 1,
        "meta": {
            **run_meta("certify.py", argv, environment, device, args, record),
            "selection_draws": args.selection_draws,
            "estimation_draws": args.estimation_draws,
            "alpha": args.alpha,
            "batch": args.batch,
            "precision": args.precision,
            "compile": args.compile,
            "check": {
                "radii": args.check_radii,
                "steps": args.check_steps,
                "noise_draws": args.check_noise_draws,
                "prediction_draws": args.check_prediction_draws,
            },
        },
        "defenses": summaries,
    }
    write_certification(out, results, per_image)
    print((out / "results.md").read_text())
    return results


def curve(correct: Tensor, radius: Tensor, step: float = 0.05) -> list[tuple[float, float]]:
    """(radius, certified accuracy) from 0 to past the largest certified radius, every `step`."""
    top = float(radius.max()) if len(radius) else 0.0
    return [(round(at, 4), certified_accuracy(correct, radius, at)) for at in np.arange(0, top + 2 * step, step)]


def _markdown(results: dict[str, Any]) -> str:
    meta, summaries = results["meta"], results["defenses"]
    lines = [
        "# Certified accuracy (randomized smoothing, L2)",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['device']}; {meta['data']}, {meta['n']} class-balanced test "
        f"images (index hash {meta['index_hash']}); n0 = {meta['selection_draws']}, n = {meta['estimation_draws']}, "
        f"alpha = {meta['alpha']}.",
        "",
        "| defense | sigma | abstained | " + " | ".join(f"r = {at}" for at in TABLE_RADII) + " | img/s | forwards/s |",
        "|---" * (5 + len(TABLE_RADII)) + "|",
    ]
    for summary in summaries:
        accuracy = " | ".join(f"{100 * summary['certified_accuracy'][str(at)]:.1f}" for at in TABLE_RADII)
        rate = meta["n"] / summary["seconds"]
        lines.append(
            f"| {summary['defense']} | {summary['sigma']} | {100 * summary['abstained']:.1f} | {accuracy} | "
            f"{rate:.2f} | {summary['forward_passes_per_s']:.0f} |"
        )
    lines += ["", "Empirical check (SmoothAdv PGD below each image's certified radius, then PREDICT):", ""]
    lines += ["| defense | radius | certified beyond it | kept | abstained | flipped |", "|---|---|---|---|---|---|"]
    for summary in summaries:
        for row in summary["empirical_check"]:
            lines.append(
                f"| {summary['defense']} | {row['radius']} | {row['attacked']} | {row['kept']} | {row['abstained']} | "
                f"{row['flipped']} |"
            )
    return "\n".join(lines) + "\n"


def _curve_png(summaries: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for summary in summaries:
        radii, accuracy = zip(*summary["curve"])
        name = summary["spec"]["name"]  # the classifier alone dashed, behind a denoiser solid
        axes.plot(
            radii,
            [100 * value for value in accuracy],
            linestyle="--" if name == "smoothing" else "-",
            label=f"{summary['defense']} (sigma {summary['sigma']})",
        )
    axes.set_xlabel("L2 radius")
    axes.set_ylabel("certified accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    stream = io.BytesIO()
    figure.tight_layout()
    figure.savefig(stream, format="png", dpi=110)
    plt.close(figure)
    return stream.getvalue()


def write_certification(out: Path, results: dict[str, Any], per_image: list[dict[str, Any]]) -> None:
    curves = [
        {"defense": summary["defense"], "radius": at, "certified_accuracy": accuracy}
        for summary in results["defenses"]
        for at, accuracy in summary["curve"]
    ]
    atomic_write_bytes(csv_text(per_image).encode(), out / "certify.csv")
    atomic_write_bytes(csv_text(curves).encode(), out / "curve.csv")
    atomic_write_bytes(json.dumps(results, indent=1).encode(), out / "results.json")
    atomic_write_bytes(_markdown(results).encode(), out / "results.md")
    atomic_write_bytes(_curve_png(results["defenses"]), out / "curve.png")
