"""Seconds per image of the deep-image-prior defense: the whole batch fitted at once (one grouped
network per image) against the same images fitted one at a time. Prints one JSON line.

    python benchmarks/dip_throughput.py --classifier checkpoints/victim_cifar10_resnet18.pt \
        --defense configs/defenses/dip_cifar10.yaml --data cifar10 --data-root data/cifar10 --batch 500 --single 20

Both runs use the defense exactly as eval.py builds it (same settings, same classifier), on the
first `--batch` class-balanced test images; the one-at-a-time run fits the first `--single` of
them. Times include the classifier's labels of the trajectory and the stitching, with a device
synchronization only at the two ends of each timed span.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from classifiers import load_classifier
from datamodules import data_set_names
from defenses import make_defense
from engine.benchmarking import emit, timed
from evaluation.cli import load_subset, resolve_device


def timed_once(device: torch.device, run: Callable[[], object]) -> float:
    return timed(lambda _: run(), 1, 0, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--defense", default="configs/defenses/dip_cifar10.yaml", help="a dip spec or spec file")
    parser.add_argument("--data", default="cifar10", choices=data_set_names())
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batch", dest="n", type=int, default=500, help="images fitted together")
    parser.add_argument("--single", type=int, default=20, help="images fitted one at a time")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(seed=0, indices=None)  # eval.py's class-balanced subset for seed 0
    args = parser.parse_args()
    device = resolve_device(args.device)
    x, _, _, _ = load_subset(args, device)
    defense = make_defense(args.defense, load_classifier(args.classifier).to(device)).to(device).eval()
    defense.reseed(0)
    defense(x[: min(4, len(x))])  # warm-up: kernels, allocator
    batched = timed_once(device, lambda: defense(x))
    single = timed_once(device, lambda: [defense(x[i : i + 1]) for i in range(args.single)])
    emit(
        "dip_throughput",
        device,
        defense=defense.spec(),
        batch=len(x),
        single=args.single,
        batched_s_per_image=round(batched / len(x), 4),
        single_s_per_image=round(single / args.single, 4),
        speedup=round((single / args.single) / (batched / len(x)), 2),
    )


if __name__ == "__main__":
    main()
