"""Training throughput of any restorer config, and the share of its step spent making the
training pair (the degradation and the on-the-fly attack against the frozen classifier, plus
TRN's gradient maps). Prints one JSON line.

    python benchmarks/restorer_step.py --config configs/trn_cifar10.yaml --batch 256
    python benchmarks/restorer_step.py --config configs/rain_shapes.yaml --batch 64 --steps 20 \
        --model.init_args.classifier checkpoints/victim_shapes.pt      # any config override

The module is built from the config as train.py builds it (its classifier file must exist) and
runs its own `training_step` on one random batch resident on the device (no data loading), with
the config's precision as autocast, AdamW on the restorer. Two timed loops of `--steps` steps
after `--warmup`: make_pair alone, then the whole step with backward and optimizer step; the
device is synchronized only at the ends of each loop. pair_share = pair time / step time.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from engine.benchmarking import emit, timed
from engine.cli import RestorationCLI

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args, overrides = parser.parse_known_args()
    cli = RestorationCLI(args=["--config", args.config, *overrides], run=False)
    module, data, precision = cli.model, cli.datamodule, str(cli.trainer.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = module.to(device).train()
    module.setup("fit")
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, data.channels, data.image_size, data.image_size, device=device)
    y = torch.randint(0, data.num_classes, (args.batch,), device=device)
    optimizer = torch.optim.AdamW(module.restorer.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision in AUTOCAST)

    def pair(step: int) -> None:
        with autocast:
            module.make_pair(x, y, step)

    def step(step: int) -> None:
        with autocast:
            loss = module.training_step((x, y), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no trainer: the step's logging is a no-op
        pair_seconds = timed(pair, args.steps, args.warmup, device)
        step_seconds = timed(step, args.steps, args.warmup, device)
    emit(
        "restorer_step",
        device,
        config=args.config,
        restorer=type(module).__name__,
        precision=precision,
        batch=args.batch,
        steps=args.steps,
        train_img_per_s=round(args.steps * args.batch / step_seconds, 1),
        pair_img_per_s=round(args.steps * args.batch / pair_seconds, 1),
        pair_share=round(pair_seconds / step_seconds, 3),
    )


if __name__ == "__main__":
    main()
