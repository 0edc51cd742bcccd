"""Load a victim classifier from a file, and export a Lightning checkpoint of one.

    python -m classifiers.export runs/<run>/checkpoints/last.ckpt checkpoints/<run>.pt

`load_classifier` is the one classifier loader of the project: training (the frozen
classifier in a restorer's loss) and evaluation both go through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from classifiers.factory import build_classifier
from classifiers.frozen import FrozenClassifier
from classifiers.victim import CLASSIFIER_SPEC_KEYS
from engine.export import NotAnExportError, export_command, load_weights_only, make_export, read_export, save_new_export

_NET_PREFIX = "classifier.net."


def classifier_from_spec(spec: dict[str, Any], state_dict: dict[str, Any]) -> FrozenClassifier:
    """Rebuild a frozen classifier from its spec (CLASSIFIER_SPEC_KEYS) and network weights (strict)."""
    net = build_classifier(spec["arch"], spec["num_classes"], spec["in_chans"], **(spec["arch_kwargs"] or {}))
    net.load_state_dict(state_dict, strict=True)
    return FrozenClassifier(net, spec["mean"], spec["std"], spec=spec)


def _from_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(spec, network state dict, meta) of a VictimModule's Lightning checkpoint."""
    checkpoint = load_weights_only(path, "Lightning checkpoint")
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    missing = [key for key in CLASSIFIER_SPEC_KEYS if key not in hparams]
    if missing:
        raise NotAnExportError(f"'{path}' is not a checkpoint of a VictimModule: its hyperparameters lack {missing}")
    spec = {key: hparams[key] for key in CLASSIFIER_SPEC_KEYS}
    weights = {k[len(_NET_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_NET_PREFIX)}
    meta = {
        "source_checkpoint": str(path),
        "epochs": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
    }
    return spec, weights, meta


def load_classifier(path: str | Path) -> FrozenClassifier:
    """A frozen classifier (on the CPU) from an export file (.pt) or a VictimModule checkpoint (.ckpt)."""
    path = Path(path)
    if path.suffix == ".ckpt":
        spec, weights, _ = _from_checkpoint(path)
    else:
        payload = read_export(path, kind="classifier")
        spec, weights = payload["model"], payload["state_dict"]
    return classifier_from_spec(spec, weights)


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the export file of a VictimModule checkpoint; refuses to replace a file unless told to."""

    def make() -> dict[str, Any]:
        spec, weights, meta = _from_checkpoint(Path(checkpoint))
        classifier_from_spec(spec, weights)  # refuse to write a file that would not load
        return make_export("classifier", spec, weights, meta)

    return save_new_export(make, out, overwrite)


if __name__ == "__main__":
    export_command(
        "Export a VictimModule Lightning checkpoint to a classifier file.", "a VictimModule", export_checkpoint
    )
