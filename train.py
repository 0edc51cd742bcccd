"""Train any model of this project (victim classifiers, restorers) with Lightning.

    python train.py fit --config configs/victim_shapes.yaml                  # CPU, ~40 s
    python train.py fit --config configs/victim_cifar10.yaml --trainer.precision bf16-mixed
    python train.py fit --config configs/victim_cifar10.yaml --trainer.devices 8 --trainer.strategy ddp
    python train.py fit --config configs/victim_cifar10.yaml --ckpt_path last     # resume the run
    python train.py test --config configs/victim_cifar10.yaml --ckpt_path last

Every Trainer, model and data option can be overridden on the command line; see
`python train.py fit --help` and `--print_config`. Where a run writes: engine/cli.py.
"""

from engine.cli import RestorationCLI


def main() -> None:
    RestorationCLI()


if __name__ == "__main__":
    main()
