"""Build a defense by name, from a spec string, or from an exported restorer file.

    jpeg:quality=75        median:kernel=3        wavelet:sigma=0.04,wavelet=db2
    smoothing:sigma=0.25,draws=1000               (randomized smoothing of the classifier alone)
    configs/defenses/dip_cifar10.yaml             (a YAML file holding one spec: name: dip, iterations: ...)
    checkpoints/sr_cifar10.pt                     (a restorer's export: its kind is in restorers/registry.py)
    runs/sr_cifar10/checkpoints/last.ckpt         (a restorer's Lightning checkpoint)

Values are Python literals (`None`, numbers, `True`); anything else is taken as a string.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

from torch import nn

from defenses.base import Defense, describe
from defenses.cii import CIIDefence
from defenses.dip import DipDefense
from defenses.randomization import StructuredRandomization
from defenses.smoothing import GaussianSmoothing
from defenses.transforms import BicubicDownUp, BitDepth, Identity, Jpeg, MedianFilter, RandomResizePad
from defenses.wavelet import WaveletDenoise

DEFENSES: dict[str, type[Defense]] = {
    "identity": Identity,
    "jpeg": Jpeg,
    "bit_depth": BitDepth,
    "median": MedianFilter,
    "bicubic": BicubicDownUp,
    "wavelet": WaveletDenoise,
    "random_resize_pad": RandomResizePad,
    "srd": StructuredRandomization,
    "cii": CIIDefence,
    "dip": DipDefense,
    "smoothing": GaussianSmoothing,
}

EXPORT_SUFFIXES = (".pt", ".pth", ".ckpt")
SPEC_SUFFIXES = (".yaml", ".yml")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(text: str) -> dict[str, Any]:
    """'jpeg:quality=75' -> {"name": "jpeg", "quality": 75}."""
    name, _, arguments = text.partition(":")
    spec: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"defense argument {item!r} in {text!r} is not key=value")
        spec[key.strip()] = _literal(value.strip())
    return spec


def build_defense(spec: dict[str, Any], classifier: nn.Module | None = None) -> Defense:
    """A defense from {"name": ..., **arguments}; `classifier` goes to defenses that need it."""
    arguments = {key: value for key, value in spec.items() if key != "name"}
    if spec["name"] not in DEFENSES:
        raise ValueError(f"unknown defense {spec['name']!r}; known: {sorted(DEFENSES)} or an exported restorer file")
    cls = DEFENSES[spec["name"]]
    accepted = set(inspect.signature(cls).parameters) - {"classifier", "network"}  # modules, not spec values
    unknown = set(arguments) - accepted
    if unknown:
        raise ValueError(f"defense {spec['name']!r} takes {sorted(accepted)}, not {sorted(unknown)}")
    if cls.needs_classifier:
        if classifier is None:
            raise ValueError(f"defense {spec['name']!r} needs the classifier")
        arguments["classifier"] = classifier
    return cls(**arguments)


def load_exported_defense(path: str | Path, classifier: nn.Module | None = None) -> Defense:
    """A trained restorer's defense from its export file or its Lightning checkpoint (weights-only loading).

    The restorers sit above the defenses (they build on them), so they are asked here, at call
    time, not imported with this module."""
    from restorers.export import defense_from_file

    return defense_from_file(path, classifier)


def make_defenses(texts: list[str], classifier: nn.Module | None = None) -> list[Defense]:
    """The defenses of one run, each with a label no other shares: its spec as one token, and where two
    specs read the same (two exports of one kind and the same settings), '@' and the file's name after it
    (its whole path where two names are alike too)."""
    repeated = sorted({text for text in texts if texts.count(text) > 1})
    if repeated:
        raise ValueError(f"--defense lists {repeated} more than once; give each defense once")
    defenses = [make_defense(text, classifier) for text in texts]
    for suffix in (lambda text: Path(text).name, str):
        labels = [defense.label for defense in defenses]
        for text, defense in zip(texts, defenses):
            if labels.count(defense.label) > 1:
                defense.label = f"{describe(defense.spec())}@{suffix(text)}"
    return defenses


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A defense spec from a YAML file: a mapping with `name` and the defense's arguments."""
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"defense spec file '{path}' not found")
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"'{path}' must hold a mapping with `name` (one of {sorted(DEFENSES)}) and its arguments")
    return spec


def make_defense(text: str, classifier: nn.Module | None = None) -> Defense:
    """A defense from a spec string, a YAML spec file or an export file path (see module docstring)."""
    if text.endswith(SPEC_SUFFIXES):
        return build_defense(read_spec_file(text), classifier)
    if text.endswith(EXPORT_SUFFIXES) or Path(text).is_file():
        return load_exported_defense(text, classifier)
    return build_defense(parse_spec(text), classifier)
