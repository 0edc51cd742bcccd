"""Training throughput of the EDSR x2 restorer: a plain PyTorch loop against the Lightning run of
the same network, batch and precision. Prints one JSON line.

    python benchmarks/sr_throughput.py --classifier checkpoints/victim_cifar10_resnet18.pt --batch 256 --lr-size 16

Both train on one random batch resident on the device (no data loading), restoration loss only
(classifier weight 0, no adversarial share), AdamW, bf16 autocast on CUDA and fp32 on the CPU,
channels_last. Images per second are counted over `--steps` steps after `--warmup` steps, with a
device synchronization only at the two ends of the timed span.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from engine.benchmarking import emit, lightning_fit_seconds, synchronize
from restorers.edsr import build_edsr
from restorers.sr import SuperResolutionRestorer, bicubic_resize


def plain_loop(args: argparse.Namespace, device: torch.device, x: torch.Tensor) -> float:
    network = build_edsr(args.preset, 2, 3).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    low = bicubic_resize(x, (args.lr_size, args.lr_size)).contiguous(memory_format=torch.channels_last)
    started = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = synchronize(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.l1_loss(network(low).float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return args.steps * len(x) / (synchronize(device) - started)


def lightning_run(args: argparse.Namespace, device: torch.device, x: torch.Tensor) -> float:
    module = SuperResolutionRestorer(
        args.classifier,
        preset=args.preset,
        denoise=False,
        adversarial_share=0.0,
        classifier_weight=0.0,
        lr=1e-4,
        schedule="constant",
    )
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    return args.steps * len(x) / lightning_fit_seconds(module, x, y, precision, args.steps, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--classifier", required=True, help="any victim file (the Lightning module needs one; its loss weight is 0)"
    )
    parser.add_argument("--preset", default="baseline")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr-size", type=int, default=16, help="low-resolution side; the target is twice it")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.rand(args.batch, 3, 2 * args.lr_size, 2 * args.lr_size, device=device)
    plain, lightning = plain_loop(args, device, x), lightning_run(args, device, x)
    emit(
        "sr_throughput",
        device,
        preset=args.preset,
        batch=args.batch,
        lr_size=args.lr_size,
        plain_img_per_s=round(plain, 1),
        lightning_img_per_s=round(lightning, 1),
        lightning_over_plain=round(lightning / plain, 3),
    )


if __name__ == "__main__":
    main()
