"""Learned restorers, each a LightningModule trained with a frozen classifier in its loss
(restorers/base.py), registered by export kind (restorers/registry.py)."""

from restorers.base import RestorerModule
from restorers.inpainter import InpainterRestorer, InpaintingNetwork  # noqa: E402  (kind "cii")
from restorers.rain import RainDefense, RainRestorer  # noqa: E402  (kind "rain")
from restorers.registry import register_restorer, restorer_class, restorer_kinds

# The registry: importing a restorer's module registers it under its kind (one line per restorer).
from restorers.sr import SuperResolutionDefense, SuperResolutionRestorer  # noqa: E402  (kind "sr")
from restorers.trn import TrnDefense, TrnRestorer, TwoStreamRestorationNetwork  # noqa: E402  (kind "trn")

__all__ = [
    "InpainterRestorer",
    "InpaintingNetwork",
    "RainDefense",
    "RainRestorer",
    "RestorerModule",
    "SuperResolutionDefense",
    "SuperResolutionRestorer",
    "TrnDefense",
    "TrnRestorer",
    "TwoStreamRestorationNetwork",
    "register_restorer",
    "restorer_class",
    "restorer_kinds",
]
