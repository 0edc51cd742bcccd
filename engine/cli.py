"""The project's LightningCLI: one run name decides where everything of a run is written.

    runs/<run.name>/               TensorBoard events, config.yaml, hparams.yaml
    runs/<run.name>/checkpoints/   last.ckpt (every epoch, and every N steps or M minutes when asked), its
                                   previous version previous.ckpt, and the best checkpoint
    checkpoints/<run.name>.pt      the export file, written when fit completes

Fixed folders (no version_N) are what make `--ckpt_path last` find the run's own last
checkpoint; a fresh `fit` into a run that already has one is refused rather than silently
overwriting it. Bad input (a setting or file the models and data refuse, a frozen classifier that
does not fit the data, an unreadable image, a damaged checkpoint) ends the command with one
`error:` line, before anything of the run is written. Every model takes `num_classes` and
`in_chans`, linked from the data module, and the data module's shuffle/augmentation seed is linked
from `seed_everything`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from engine.callbacks import ExportOnFitEnd
from engine.checkpointing import (
    AtomicCheckpointIO,
    LoaderPositionOnResume,
    MidEpochCheckpoint,
    SaveOnSigterm,
    checkpoint_problem,
    newest_intact_checkpoint,
)
from engine.errors import InputError, reported_as_one_line


def _checkpoint_dir(root: str, name: str) -> str:
    return str(Path(root) / name / "checkpoints")


def _export_path(export_dir: str, name: str) -> str:
    return str(Path(export_dir) / f"{name}.pt")


def _data_seed(seed_everything: Any) -> int:
    # seed_everything may be true/false (Lightning's "random seed" / "no seeding"): data order then uses 0.
    return seed_everything if isinstance(seed_everything, int) and not isinstance(seed_everything, bool) else 0


class RestorationCLI(LightningCLI):
    def __init__(self, **kwargs: Any) -> None:
        with reported_as_one_line():
            super().__init__(
                pl.LightningModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                seed_everything_default=0,
                # A resumed run writes its config again into the same run folder (Lightning #17115).
                save_config_kwargs={"overwrite": True},
                **kwargs,
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run.name", type=str, required=True, help="run name: runs/<name>/ and checkpoints/<name>.pt"
        )
        parser.add_argument("--run.root", type=str, default="runs", help="folder of the run folders")
        parser.add_argument("--run.export_dir", type=str, default="checkpoints", help="folder of the export files")
        parser.add_argument(
            "--run.checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="also write last.ckpt every N training steps (a resume from it is exact mid-epoch)",
        )
        parser.add_argument(
            "--run.checkpoint_every_minutes",
            type=float | None,
            default=None,
            help="also write last.ckpt every M minutes of training",
        )
        # Two checkpoint callbacks: the best by a metric, and last.ckpt rewritten every epoch. One
        # ModelCheckpoint(save_last=True, monitor=...) refreshes last.ckpt only in epochs that also
        # saved a top-k file, so a resume could silently restart from an older epoch.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.filename": "last", "last_checkpoint.enable_version_counter": False})
        for key in ("checkpoint.dirpath", "last_checkpoint.dirpath"):
            parser.link_arguments(("run.root", "run.name"), key, compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(ExportOnFitEnd, "export")
        parser.link_arguments(("run.export_dir", "run.name"), "export.path", compute_fn=_export_path)
        parser.link_arguments("seed_everything", "data.init_args.seed", compute_fn=_data_seed)
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.in_chans", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        """Build the model, data and trainer; a setting or file they refuse, or a frozen classifier that
        does not fit the data, is bad input."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, FileExistsError) as refused:
            raise InputError(str(_first_cause(refused))) from refused
        check_data = getattr(self.model, "check_data", None)  # models with a frozen classifier (restorers)
        size = getattr(self.datamodule, "image_size", None)
        if check_data is not None and size is not None:
            check_data((self.datamodule.channels, size, size), self.datamodule.num_classes)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        run = self._get(self.config_init, "run")
        run_dir = Path(run.root) / run.name
        kwargs.setdefault("default_root_dir", str(run_dir))  # also where SLURM requeue checkpoints go
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(save_dir=run.root, name=run.name, version="", default_hp_metric=False)
        if trainer_config.get("plugins") is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        checkpoints = _checkpoint_dir(run.root, run.name)
        trainer.callbacks.extend([SaveOnSigterm(checkpoints), LoaderPositionOnResume()])
        if run.checkpoint_every_n_steps or run.checkpoint_every_minutes:
            trainer.callbacks.append(
                MidEpochCheckpoint(checkpoints, run.checkpoint_every_n_steps, run.checkpoint_every_minutes)
            )
        return trainer

    def before_fit(self) -> None:
        last = Path(self.trainer.checkpoint_callback.dirpath) / "last.ckpt"
        ckpt_path = self.config.fit.ckpt_path
        if ckpt_path is None and last.exists():
            raise InputError(
                f"run '{self.config.fit.run.name}' already has checkpoints ({last}). Resume it with "
                "`--ckpt_path last`, start a new run with another `--run.name`, or delete "
                f"'{last.parent.parent}' to start this one again."
            )
        if ckpt_path == "last" and last.exists():
            self.config_init.fit.ckpt_path = str(intact_or_fallback(last))
        # The data is read now, not in fit: Lightning opens the run's TensorBoard file before it sets up
        # the data, and bad data must be an error before anything of the run is written (setup is
        # idempotent: fit's own call finds the splits loaded).
        self.datamodule.setup("fit")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse a damaged --ckpt_path FILE before Lightning reads it (it reads the
        checkpoint's hyperparameters first, and a damaged file fails deep inside torch)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            problem = checkpoint_problem(ckpt_path)
            if problem is not None:
                raise InputError(f"cannot resume from '{ckpt_path}': {problem}. {_fallback_hint(Path(ckpt_path))}")


def _first_cause(error: BaseException) -> BaseException:
    """The error a refusal started from: jsonargparse re-raises a model's or data module's error inside its
    own ("Does not validate against any of the Union subtypes ... Given value: <the whole config>"),
    keeping the original message at the end of the chain."""
    while not isinstance(error, InputError) and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def intact_or_fallback(last: Path) -> Path:
    """`last` if it reads back, else the newest intact checkpoint beside it (saying so), else an error."""
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    fallback, damaged = newest_intact_checkpoint(last.parent)
    if fallback is None:
        found = "; ".join(f"{path.name}: {why}" for path, why in damaged.items())
        raise InputError(
            f"cannot resume from '{last}': {problem}, and no checkpoint beside it reads back ({found}). "
            "Start the run again under another --run.name."
        )
    rank_zero_warn(f"'{last}' is damaged ({problem}); resuming from the newest intact checkpoint, '{fallback}'")
    return fallback


def _fallback_hint(path: Path) -> str:
    fallback, _ = newest_intact_checkpoint(path.parent)  # a missing folder has none
    if fallback is None:
        return "No intact checkpoint lies beside it."
    return f"The newest intact checkpoint beside it is '{fallback}': pass it as --ckpt_path (or --ckpt_path last)."
