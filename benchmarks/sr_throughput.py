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

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine.benchmarking import emit, synchronize
from engine.callbacks import ChannelsLast
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


class _Clock(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = 0.0
        self.stopped = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.started = synchronize(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        self.stopped = synchronize(pl_module.device)


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
    batches = DataLoader(range(args.warmup + args.steps), batch_size=1, collate_fn=lambda _: (x, y))
    clock = _Clock(args.warmup)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=args.warmup + args.steps,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        callbacks=[ChannelsLast(), clock],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=batches)
    return args.steps * len(x) / (clock.stopped - clock.started)


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
