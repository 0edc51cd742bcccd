"""Rebuild a restorer from its Lightning checkpoint, and export one.

    python -m restorers.export runs/<run>/checkpoints/last.ckpt checkpoints/<run>.pt

The export holds the EMA weights when the run used RestorerEMA (as the export written at the end
of fit does), the restorer's weights only (never the classifier's), and what rebuilds the defense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from defenses.base import Defense
from engine.export import NotAnExportError, export_command, load_weights_only, read_export, save_new_export
from restorers.base import RestorerModule
from restorers.registry import defense_from_export, restorer_class, restorer_kinds

_EMA_STATE = "RestorerEMA"


def _ema_weights(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith(_EMA_STATE) and state.get("average") is not None:
            return state["average"]
    return None


def module_from_checkpoint(path: str | Path) -> RestorerModule:
    """The restorer module of a checkpoint written by `train.py fit`, with its EMA weights if any."""
    checkpoint = load_weights_only(path, "Lightning checkpoint")
    kind = checkpoint.get("restorer_kind") if isinstance(checkpoint, dict) else None
    if kind not in restorer_kinds():
        raise NotAnExportError(f"'{path}' is not a checkpoint of a restorer (kinds: {restorer_kinds()})")
    arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    # Rebuilt to be read, not trained; its weights are the checkpoint's, not those it started from.
    module = restorer_class(kind)(**{**arguments, "compile_networks": False, "init_from": None})
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    average = _ema_weights(checkpoint)
    if average is not None:
        module.restorer.load_state_dict({**module.restorer.state_dict(), **average}, strict=True)
    return module.eval()


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the export file of a restorer checkpoint; refuses to replace a file unless told to."""

    def make() -> dict[str, Any]:
        return module_from_checkpoint(checkpoint).to_export({"source_checkpoint": str(checkpoint)})

    return save_new_export(make, out, overwrite)


def defense_from_file(path: str | Path, classifier: nn.Module | None = None) -> Defense:
    """The defense of a restorer's export file or Lightning checkpoint, around `classifier` where it needs one."""
    export = module_from_checkpoint(path).to_export({}) if str(path).endswith(".ckpt") else read_export(path)
    kind = export["kind"]
    if kind == "classifier":
        raise NotAnExportError(f"'{path}' exports a classifier, not a defense; pass it as --classifier")
    if kind not in restorer_kinds():
        raise NotAnExportError(f"'{path}' exports a {kind!r}; defenses can be loaded from {restorer_kinds()}")
    return defense_from_export(export, classifier, str(path))


if __name__ == "__main__":
    export_command(
        "Export a restorer's Lightning checkpoint to a defense file for eval.py.", "a restorer", export_checkpoint
    )
