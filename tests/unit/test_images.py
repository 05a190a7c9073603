"""Tensors to PIL images and grids of them: the channel counts PIL can show, and grids of mixed modes."""

from __future__ import annotations

import pytest
import torch

from ldm.images import make_grid, to_pil


def test_to_pil_takes_one_or_three_channels_and_names_any_other() -> None:
    assert [to_pil(torch.zeros(1, c, 4, 4))[0].mode for c in (1, 3)] == ["L", "RGB"]
    for channels in (2, 4):  # PIL's "Invalid mode for data type" before
        with pytest.raises(ValueError, match=rf"1 \(L\) or 3 \(RGB\) channels, got shape \(1, {channels}, 4, 4\)"):
            to_pil(torch.zeros(1, channels, 4, 4))


def test_a_grid_of_grayscale_and_colour_images_shows_both() -> None:
    """A grayscale image first made the whole grid grayscale (the colour ones pasted into one channel)."""
    gray, red = to_pil(torch.zeros(1, 1, 4, 4))[0], to_pil(torch.tensor([1.0, -1, -1]).view(1, 3, 1, 1).expand(
        1, 3, 4, 4))[0]
    grid = make_grid([gray, red])
    assert grid.mode == "RGB" and grid.getpixel((1, 1)) == (128, 128, 128) and grid.getpixel((5, 1)) == (255, 0, 0)
    assert make_grid([gray, gray]).mode == "L"
    with pytest.raises(ValueError, match="one size"):
        make_grid([gray, to_pil(torch.zeros(1, 1, 8, 8))[0]])
    with pytest.raises(ValueError, match="cols must be >= 1"):
        make_grid([gray], cols=-1)
