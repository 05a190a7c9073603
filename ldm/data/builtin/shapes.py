"""Procedural coloured-shape images with exact captions: a dataset that needs no download and that a judge can check.

Each item is a square RGB image of size ``S`` with a constant background and one filled shape (circle, square or
upright isosceles triangle) in one of seven colours, centred in one of five regions, and the caption
``"a {color} {shape} in the {position}"``. ``colors=`` draws from another list, which may name the extra colours
(``EXTRA_COLORS``) that the default dataset never shows: new words to teach a trained model (a LoRA, for example).
Item ``i`` is drawn from its own RNG seeded by ``(seed, i)``, so it does not depend on access order, workers or the
other items.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image, ImageDraw

BACKGROUND: tuple[int, int, int] = (30, 30, 30)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
}

# colours outside the default palette, only drawn when ``colors=`` names them
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "cyan": (40, 200, 200),
}

PALETTE: dict[str, tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}  # every colour name the dataset knows

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# region name -> centre as a fraction of the image side (x, y); y grows downwards as in PIL
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}

JITTER: float = 1 / 16  # max centre offset per axis, as a fraction of S
MIN_EXTENT: float = 0.25  # bounding-box side range, as a fraction of S
MAX_EXTENT: float = 0.4


def caption_for(color: str, shape: str, position: str) -> str:
    """The one caption grammar of this dataset."""
    return f"a {color} {shape} in the {position}"


def check_colors(colors: Sequence[str] | None) -> tuple[str, ...]:
    """``colors`` as a tuple of known colour names (None: the default seven); a ValueError names unknown ones."""
    if colors is None:
        return tuple(COLORS)
    if isinstance(colors, str) or not colors:
        raise ValueError(f"colors must be a non-empty list of colour names, got {colors!r}")
    unknown = [c for c in colors if c not in PALETTE]
    if unknown:
        raise ValueError(f"unknown shapes colours {unknown}; known: {', '.join(PALETTE)}")
    return tuple(colors)


def random_caption(rng: random.Random) -> str:
    """A caption drawn uniformly from the dataset's vocabulary (for prompts in sampling and tests)."""
    return caption_for(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS)))


def draw_shape(
    size: int, shape: str, color: str, center: tuple[float, float], extent: float
) -> Image.Image:
    """Draw one filled shape with bounding box ``extent`` (pixels) centred at ``center`` (pixels) on the background."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = center
    h = extent / 2
    box = (cx - h, cy - h, cx + h, cy + h)
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return image


class ShapesDataset:
    """``length`` deterministic shape images of side ``size``; indexable and iterable.

    Items are dicts ``{image: PIL.Image (RGB), caption, color, shape, position, center (x, y px), extent (px)}``.
    ``colors`` (default: the seven of ``COLORS``) are drawn uniformly from the list, so a colour listed twice is
    drawn twice as often; with the default, item ``i`` is the same as ever.
    """

    def __init__(self, size: int = 32, seed: int = 0, length: int = 10_000,
                 colors: Sequence[str] | None = None) -> None:
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        self.colors = check_colors(colors)
        self.size = size
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        # a string seed is hashed deterministically by random.Random (sha512), independent of PYTHONHASHSEED
        rng = random.Random(f"shapes/{self.seed}/{index}")
        color = rng.choice(self.colors)
        shape = rng.choice(SHAPES)
        position = rng.choice(list(POSITIONS))
        s = self.size
        fx, fy = POSITIONS[position]
        cx = fx * s + rng.uniform(-JITTER, JITTER) * s
        cy = fy * s + rng.uniform(-JITTER, JITTER) * s
        extent = rng.uniform(MIN_EXTENT, MAX_EXTENT) * s
        image = draw_shape(s, shape, color, (cx, cy), extent)
        return {
            "image": image,
            "caption": caption_for(color, shape, position),
            "color": color,
            "shape": shape,
            "position": position,
            "center": (cx, cy),
            "extent": extent,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.length):
            yield self[i]
