"""The one registry of data sets: name -> the data module that loads it.

A data module registers itself where it is defined, `@register_data_set("cifar10")`, and the
name is what eval.py's `--data` and its results use; `datamodules/__init__.py` imports every
module, so importing the package fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from datamodules.base import TensorImageDataModule

_DATA_SETS: dict[str, type[TensorImageDataModule]] = {}
DataModule = TypeVar("DataModule", bound=type)


def register_data_set(name: str) -> Callable[[DataModule], DataModule]:
    """Class decorator: registers the data module under `name`."""

    def register(cls: DataModule) -> DataModule:
        if name in _DATA_SETS and _DATA_SETS[name] is not cls:
            raise ValueError(f"data set name {name!r} is taken by {_DATA_SETS[name].__qualname__}")
        _DATA_SETS[name] = cls
        return cls

    return register


def data_set_names() -> list[str]:
    import datamodules  # noqa: F401  (its imports register the project's data sets)

    return sorted(_DATA_SETS)


def data_module_class(name: str) -> type[TensorImageDataModule]:
    if name not in data_set_names():
        raise KeyError(f"unknown data set {name!r}; registered: {data_set_names()} (datamodules/registry.py)")
    return _DATA_SETS[name]
