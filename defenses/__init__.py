"""Defenses: modules mapping [0,1] images to [0,1] images, evaluated in front of a classifier."""

from defenses.base import DefendedClassifier, Defense, describe
from defenses.cii import CIIDefence, Inpainter, TeleaInpainter
from defenses.dip import DipDefense
from defenses.factory import DEFENSES, build_defense, make_defense, make_defenses, parse_spec
from defenses.randomization import StructuredRandomization, circular_shift
from defenses.smoothing import GaussianSmoothing, Smoothing
from defenses.transforms import BicubicDownUp, BitDepth, Identity, Jpeg, MedianFilter, RandomResizePad
from defenses.wavelet import WaveletDenoise, wavelet_denoise

__all__ = [
    "DEFENSES",
    "BicubicDownUp",
    "BitDepth",
    "CIIDefence",
    "DefendedClassifier",
    "Defense",
    "DipDefense",
    "GaussianSmoothing",
    "Identity",
    "Inpainter",
    "Jpeg",
    "TeleaInpainter",
    "MedianFilter",
    "RandomResizePad",
    "Smoothing",
    "StructuredRandomization",
    "circular_shift",
    "WaveletDenoise",
    "build_defense",
    "describe",
    "make_defense",
    "make_defenses",
    "parse_spec",
    "wavelet_denoise",
]
