"""Data sets as LightningDataModules: batches reach models as (x: (N,C,H,W) float in [0,1], y: (N,) int64)."""

from datamodules.base import DataNotFoundError, ImageSplit, TensorImageDataModule
from datamodules.image_folder import ImageFolderStream, ImageFolderTensors
from datamodules.registry import data_module_class, data_set_names, register_data_set
from datamodules.shapes import SHAPE_CLASSES, Shapes, render_shapes
from datamodules.torchvision_sets import CIFAR10, STL10, SVHN, FashionMNIST

__all__ = [
    "CIFAR10",
    "SVHN",
    "STL10",
    "FashionMNIST",
    "Shapes",
    "ImageFolderStream",
    "ImageFolderTensors",
    "TensorImageDataModule",
    "ImageSplit",
    "DataNotFoundError",
    "SHAPE_CLASSES",
    "render_shapes",
    "data_module_class",
    "data_set_names",
    "register_data_set",
]
