"""Image helpers shared by the pipeline, the training callbacks, the scripts and the data tests: tensors in
[-1, 1] to PIL images, and a grid of equally sized images."""

from __future__ import annotations

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] (or one [C, H, W] image) in [-1, 1] -> PIL images: RGB, or L for one channel."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"to_pil takes [B, C, H, W] or [C, H, W] tensors, got shape {tuple(images.shape)}")
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    arr = arr.numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images into one image, ``cols`` per row (at most 8 by default)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
