"""Victim classifiers: architectures by name, the [0,1]-input wrappers, training and loading."""

from classifiers.export import load_classifier
from classifiers.factory import ARCHITECTURES, PretrainedWeightsUnavailable, build_classifier
from classifiers.frozen import FrozenClassifier, NormalizedClassifier
from classifiers.victim import VictimModule

__all__ = [
    "ARCHITECTURES",
    "FrozenClassifier",
    "NormalizedClassifier",
    "PretrainedWeightsUnavailable",
    "VictimModule",
    "build_classifier",
    "load_classifier",
]
