"""Training throughput of a victim config under Lightning against a plain PyTorch loop of the same
network, optimizer, schedule, batch and precision. Prints one JSON line.

    python benchmarks/victim_training.py --config configs/victim_cifar10.yaml --steps 100
    python benchmarks/victim_training.py --config configs/victim_shapes.yaml --batch 32 --steps 5   # any override

The module comes from the config as train.py builds it; its Lightning fit runs `training_step` (its
metrics and logging included) with the config's precision and ChannelsLast, without a logger,
checkpoints or validation. The plain loop trains a copy of the same untrained network with the
optimizer and schedule the module configures, under the same autocast. Both train on one random
batch resident on the device (no data loading, no augmentation), with the device synchronized only
at the two ends of the `--steps` timed steps after `--warmup`.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from engine.benchmarking import emit, lightning_fit_seconds, timed
from engine.cli import RestorationCLI

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def plain_seconds(module: pl.LightningModule, x, y, precision: str, steps: int, warmup: int) -> float:
    """The plain loop's seconds for `steps` steps: module's network and optimizer, no Lightning."""
    network = module.classifier.to(x.device, memory_format=torch.channels_last).train()
    trainer = pl.Trainer(max_steps=steps + warmup, logger=False)  # configure_optimizers reads the step count
    module.trainer = trainer
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(x.device.type, dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST)

    def step(_: int) -> None:
        with autocast:
            loss = F.cross_entropy(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    return timed(step, steps, warmup, x.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=None, help="default: the config's batch size")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args, overrides = parser.parse_known_args()
    cli = RestorationCLI(args=["--config", args.config, *overrides], run=False)
    data, precision = cli.datamodule, str(cli.trainer.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or data.batch_size
    x = torch.rand(batch, data.channels, data.image_size, data.image_size, device=device)
    y = torch.randint(0, data.num_classes, (batch,), device=device)
    plain_module = copy.deepcopy(cli.model)  # the same untrained network for both
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|self.log|attached).*")
        lightning = lightning_fit_seconds(cli.model, x, y, precision, args.steps, args.warmup)
        plain = plain_seconds(plain_module, x, y, precision, args.steps, args.warmup)
    emit(
        "victim_training",
        device,
        config=args.config,
        precision=precision,
        batch=batch,
        steps=args.steps,
        lightning_img_per_s=round(args.steps * batch / lightning, 1),
        plain_img_per_s=round(args.steps * batch / plain, 1),
        lightning_over_plain=round(plain / lightning, 3),
    )


if __name__ == "__main__":
    main()
