"""eval.py's PGD row on the undefended classifier against a plain PyTorch PGD loop on the same images,
batches and precision. Prints one JSON line.

    python benchmarks/attack_throughput.py --classifier checkpoints/victim_cifar10_resnet18.pt \
        --data cifar10 --data-root data/cifar10 --n 10000 --batch-size 1000 --precision bf16

The eval.py side is the row exactly as eval.py computes it (evaluation.runner.Evaluator with the
attack registry's recipe, scoring included; --precision bf16 is eval.py's bf16 classifier). The plain
loop is the same attack written out: random start, `--steps` signed-gradient steps of 2.5 eps / steps
on an fp32 summed cross-entropy, projection, one final scoring pass; no seeding per batch and the last
iterate (eval.py keeps each image's best). Both run once untimed on the first batch. Their robust
accuracies are printed beside the speeds: a faster eval.py must not be a weaker one.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules import data_set_names
from defenses import Identity
from engine.benchmarking import emit, synchronize
from evaluation.cli import load_models, load_subset, resolve_device
from evaluation.runner import Evaluator, Row, parse_eps
from evaluation.threats import THREATS


def plain_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int) -> Tensor:
    """Linf PGD with a random start: x (N,C,H,W) in [0,1] -> adversarial images in the eps-ball and [0,1]."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv).float(), y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + 2.5 * eps / steps * gradient.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def plain_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, batch_size: int) -> float:
    correct = torch.zeros((), device=x.device)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        x_adv = plain_pgd(model, xb, yb, eps, steps)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == yb).sum()
    return correct.item() / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--data", default="shapes", choices=data_set_names())
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--n", type=int, default=2000, help="class-balanced test images (eval.py's subset)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument(
        "--compile", action="store_true", help="eval.py's --compile (the plain loop uses the same model)"
    )
    parser.add_argument("--device", default="auto")
    parser.set_defaults(seed=0, indices=None, transfer_from=None, defense=[])
    args = parser.parse_args()
    device = resolve_device(args.device)
    x, y, _, num_classes = load_subset(args, device)
    classifier, _, _ = load_models(args, device, x, num_classes)
    eps, eps_label = parse_eps(args.eps)
    attack = f"pgd{args.steps}"

    def eval_row(count: int) -> Row:
        evaluator = Evaluator(classifier, x[:count], y[:count], seed=0, batch_size=args.batch_size, eval_draws=1, eot=1)
        return evaluator.attack(Identity(), THREATS["none"], attack, "linf", eps, eps_label)

    eval_row(args.batch_size)  # warm-up: kernels, allocator
    started = synchronize(device)
    row = eval_row(len(x))
    eval_seconds = synchronize(device) - started

    plain_accuracy(classifier, x[: args.batch_size], y[: args.batch_size], eps, args.steps, args.batch_size)
    started = synchronize(device)
    plain = plain_accuracy(classifier, x, y, eps, args.steps, args.batch_size)
    plain_seconds = synchronize(device) - started
    emit(
        "attack_throughput",
        device,
        classifier=args.classifier,
        data=args.data,
        n=len(x),
        batch_size=args.batch_size,
        attack=attack,
        eps=eps_label,
        precision=args.precision,
        compile=args.compile,
        eval_img_per_s=round(len(x) / eval_seconds, 1),
        plain_img_per_s=round(len(x) / plain_seconds, 1),
        eval_over_plain=round(plain_seconds / eval_seconds, 3),
        eval_robust_accuracy=round(row.accuracy, 4),
        plain_robust_accuracy=round(plain, 4),
    )


if __name__ == "__main__":
    main()
