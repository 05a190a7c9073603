"""Image helpers shared by the pipeline, the training callbacks, the scripts and the data tests: tensors in
[-1, 1] to PIL images, and a grid of equally sized images."""

from __future__ import annotations

import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] (or one [C, H, W] image) in [-1, 1] -> PIL images: RGB, or L for one channel."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"to_pil takes [B, C, H, W] or [C, H, W] tensors of 1 (L) or 3 (RGB) channels, got shape "
                         f"{tuple(images.shape)}")
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    arr = arr.numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images into one image, ``cols`` per row (at most 8 by default); RGB when any image is not
    grayscale (a grayscale one is shown as gray, not pasted into one channel)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if cols is not None and cols < 1:
        raise ValueError(f"make_grid's cols must be >= 1, got {cols}")
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"make_grid tiles images of one size, got {sorted(sizes)}")
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    grid = Image.new(mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert(mode), ((i % cols) * w, (i // cols) * h))
    return grid
