"""Inpainting masks: random training masks (boxes and brush strokes, a full mask in a fraction of samples so the
model keeps text-to-image), and the two operations SD-inpainting applies to a mask (1 = repaint, 0 = keep): the
masked image and the mask at latent size.

The mask goes to latent size by nearest-neighbour sampling, as Stable Diffusion's inpainting training and diffusers'
``StableDiffusionInpaintPipeline`` do: a model trained here then sees at sampling time, in any SD tool, the mask it
was trained with (max-pooling would grow the repainted region by up to one latent pixel against those tools).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.errors import ConfigError


@dataclass(frozen=True)
class MaskSettings:
    """How training draws masks: a full mask with ``full_mask_prob`` (text-to-image), else boxes with ``box_prob``,
    else brush strokes. Sizes are fractions of the image side; counts are drawn uniformly in [1, max]."""

    full_mask_prob: float = 0.25
    box_prob: float = 0.5
    max_boxes: int = 3
    box_size: tuple[float, float] = (0.1, 0.6)
    max_strokes: int = 4
    stroke_vertices: int = 8
    stroke_width: tuple[float, float] = (0.05, 0.15)
    stroke_length: tuple[float, float] = (0.1, 0.3)

    def __post_init__(self) -> None:
        """Check every field (a ConfigError naming it); lists from a config become tuples."""
        for name in ("full_mask_prob", "box_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"ldm_stage.inpainting.{name} must lie in [0, 1], got {value!r}")
        for name in ("max_boxes", "max_strokes", "stroke_vertices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ldm_stage.inpainting.{name} must be an integer >= 1, got {value!r}")
        for name in ("box_size", "stroke_width", "stroke_length"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value) \
                    or not 0 < value[0] <= value[1] <= 1:
                raise ConfigError(f"ldm_stage.inpainting.{name} must be [lo, hi] with 0 < lo <= hi <= 1 (fractions "
                                  f"of the image side), got {getattr(self, name)!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """An integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _boxes(mask: torch.Tensor, s: MaskSettings, generator: torch.Generator) -> None:
    """Paint 1..max_boxes axis-aligned rectangles into ``mask`` [H, W]."""
    h, w = mask.shape
    for _ in range(_randint(1, s.max_boxes, generator)):
        bh = max(1, round(_uniform(*s.box_size, generator) * h))
        bw = max(1, round(_uniform(*s.box_size, generator) * w))
        top, left = _randint(0, h - bh, generator), _randint(0, w - bw, generator)
        mask[top:top + bh, left:left + bw] = 1


def _strokes(mask: torch.Tensor, s: MaskSettings, generator: torch.Generator) -> None:
    """Paint 1..max_strokes brush strokes into ``mask`` [H, W]: random walks of thick segments (LaMa-style)."""
    h, w = mask.shape
    side = min(h, w)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    for _ in range(_randint(1, s.max_strokes, generator)):
        radius = max(0.5, _uniform(*s.stroke_width, generator) * side / 2)
        y, x = _uniform(0, h - 1, generator), _uniform(0, w - 1, generator)
        for _ in range(_randint(1, s.stroke_vertices, generator)):
            angle = _uniform(0, 2 * math.pi, generator)
            length = _uniform(*s.stroke_length, generator) * side
            y2 = min(max(y + length * math.sin(angle), 0.0), h - 1.0)
            x2 = min(max(x + length * math.cos(angle), 0.0), w - 1.0)
            dy, dx = y2 - y, x2 - x
            # distance of every pixel to the segment (y, x) -> (y2, x2)
            u = (((ys - y) * dy + (xs - x) * dx) / max(dy * dy + dx * dx, 1e-12)).clamp(0, 1)
            dist = (ys - (y + u * dy)) ** 2 + (xs - (x + u * dx)) ** 2
            mask[dist <= radius * radius] = 1
            y, x = y2, x2


def random_masks(n: int, height: int, width: int, settings: MaskSettings,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` training masks [n, 1, height, width] (float32, values in {0, 1}, 1 = repaint), drawn from
    ``generator`` alone: the same generator state gives the same masks."""
    generator = generator or torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, height, width)
    for i in range(n):
        u = float(torch.rand((), generator=generator))
        if u < settings.full_mask_prob:
            masks[i] = 1
        elif float(torch.rand((), generator=generator)) < settings.box_prob:
            _boxes(masks[i, 0], settings, generator)
        else:
            _strokes(masks[i, 0], settings, generator)
    return masks


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """Values >= 0.5 -> 1, else 0 (diffusers' ``VaeImageProcessor(do_binarize=True)``), as float32."""
    return (mask >= 0.5).float()


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B, 1, H, W] at latent ``size`` (h, w), nearest-neighbour (see the module docstring)."""
    return F.interpolate(mask.float(), size=tuple(size), mode="nearest")


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to repaint (mask >= 0.5) set to 0, mid-grey in [-1, 1]: what SD-inpainting
    encodes as its masked-image latents."""
    return image * (mask < 0.5).to(image.dtype)


__all__ = ["MaskSettings", "binarize", "latent_mask", "masked_image", "random_masks"]
