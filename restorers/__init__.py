"""Learned restorers, each a LightningModule trained with a frozen classifier in its loss
(restorers/base.py), registered by export kind (restorers/registry.py).

The registry: importing a restorer's module registers it under its kind, one import line per
restorer below (denoiser: "denoiser", inpainter: "cii", rain: "rain", robust: "robust", sr: "sr",
trn: "trn")."""

from restorers.base import RestorerModule
from restorers.denoiser import DenoiserRestorer
from restorers.inpainter import InpainterRestorer, InpaintingNetwork
from restorers.rain import RainDefense, RainRestorer
from restorers.registry import register_restorer, restorer_class, restorer_kinds
from restorers.robust import RobustDefense, RobustRestorer
from restorers.sr import SuperResolutionDefense, SuperResolutionRestorer
from restorers.trn import TrnDefense, TrnRestorer, TwoStreamRestorationNetwork
from restorers.unet import ResidualUNet

__all__ = [
    "DenoiserRestorer",
    "InpainterRestorer",
    "InpaintingNetwork",
    "RainDefense",
    "RainRestorer",
    "ResidualUNet",
    "RestorerModule",
    "RobustDefense",
    "RobustRestorer",
    "SuperResolutionDefense",
    "SuperResolutionRestorer",
    "TrnDefense",
    "TrnRestorer",
    "TwoStreamRestorationNetwork",
    "register_restorer",
    "restorer_class",
    "restorer_kinds",
]
