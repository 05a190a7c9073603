"""The shapes inpainting judge: repaint the shape of real shapes images in another colour and read it back.

    python -m ldm.eval.shapes_inpaint CKPT [--n 500] [--guidance G] [--steps N] [--margin F] [--tolerance L]
        [--legacy] [--json OUT]

For each of ``n`` held-out images (``ShapesDataset`` seed 54321, which training never draws), the mask is the
shape's bounding box grown by ``margin`` (a fraction of the side) on each edge, and the prompt names the same shape
and position in another colour, drawn per image. The model repaints the masked region at strength 1. Reported:

- the shapes judge's accuracy against the new caption (full match, colour, shape, position);
- how well the unmasked pixels are kept: their mean absolute difference to the input (8-bit levels) and the
  fraction within ``tolerance`` levels on every channel, beside the same figures for the VAE's own reconstruction
  of the input, the floor of a latent model that does not paste the input back. The same figures are given for
  the pixels more than one latent cell (the VAE's downsampling factor) away from the mask, whose latents the mask
  does not touch.

``--legacy`` runs a text-to-image model (4 latent channels) with the pipeline's ``legacy_inpaint`` blend, the
baseline an inpainting fine-tune has to beat.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from ldm.data.builtin.shapes import COLORS, ShapesDataset, caption_for
from ldm.errors import ConfigError
from ldm.eval.generate import check_json_out, write_json
from ldm.eval.shapes import ATTRIBUTES, check_counts, score, summary

HELD_OUT_SEED = 54321


def inpaint_cases(n: int, size: int, seed: int = HELD_OUT_SEED, margin: float = 1 / 16
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` held-out shapes images (uint8 [n, S, S, 3]), their masks (float32 [n, S, S], 1 = repaint: the shape's
    box grown by ``margin`` x S per edge) and captions naming each shape in a colour other than its own."""
    data = ShapesDataset(size=size, seed=seed, length=n)
    rng = random.Random(f"inpaint/{seed}")
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    images, masks, captions = [], [], []
    for item in data:
        new = rng.choice([c for c in COLORS if c != item["color"]])
        (cx, cy), half = item["center"], item["extent"] / 2 + margin * size
        inside_x = (grid >= cx - half) & (grid <= cx + half)
        inside_y = (grid >= cy - half) & (grid <= cy + half)
        masks.append((inside_y[:, None] & inside_x[None, :]).astype(np.float32))
        images.append(np.asarray(item["image"], dtype=np.uint8))
        captions.append(caption_for(new, item["shape"], item["position"]))
    return np.stack(images), np.stack(masks), captions


def check_mask_settings(margin: float, tolerance: float) -> None:
    """``--margin`` in [0, 0.5) (beyond, the grown box covers the whole image and the kept-pixel figures are NaN;
    below 0 the mask misses part of the shape) and ``--tolerance`` a finite number >= 0."""
    if not (math.isfinite(margin) and 0 <= margin < 0.5):
        raise ConfigError(f"--margin must lie in [0, 0.5) (a fraction of the side per edge), got {margin}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be a finite number of 8-bit levels >= 0, got {tolerance}")


def kept_pixels(outputs: np.ndarray, inputs: np.ndarray, masks: np.ndarray, tolerance: float) -> dict[str, float]:
    """How close ``outputs`` stay to ``inputs`` outside the masks: the mean absolute difference in 8-bit levels
    over the unmasked pixels and channels, and the fraction of unmasked pixels within ``tolerance`` on every
    channel."""
    keep = masks < 0.5
    diff = np.abs(outputs.astype(np.float32) - inputs.astype(np.float32))
    return {"mae": float(diff[keep].mean()), "within": float((diff.max(axis=-1)[keep] <= tolerance).mean())}


def grow(masks: np.ndarray, pixels: int) -> np.ndarray:
    """``masks`` [n, H, W] dilated by ``pixels`` in every direction (a square neighbourhood)."""
    out = masks.copy()
    h, w = masks.shape[-2:]
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            shifted = np.zeros_like(masks)
            shifted[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                masks[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            out = np.maximum(out, shifted)
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def evaluate(pipe, n: int = 500, guidance_scale: float | None = None, steps: int | None = None,
             sampler: str | None = None, seed: int = 0, batch: int = 100, margin: float = 1 / 16,
             tolerance: float = 16.0, legacy: bool = False) -> dict[str, Any]:
    """Inpaint ``n`` held-out images (see the module docstring) and score the repainted shapes and the kept pixels."""
    check_counts(n=n, batch=batch)
    check_mask_settings(margin, tolerance)
    size = pipe.sampling.image_size or 32
    images, masks, captions = inpaint_cases(n, size, margin=margin)
    t0 = time.perf_counter()
    outputs, floor = [], []
    for i in range(0, n, batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        m = torch.from_numpy(masks[i:i + batch])[:, None]
        out = pipe(captions[i:i + batch], image=x, mask_image=m, strength=1.0, guidance_scale=guidance_scale,
                   num_inference_steps=steps, sampler=sampler, legacy_inpaint=legacy,
                   generator=torch.Generator().manual_seed(seed + i), output_type="tensor")
        outputs.append(_to_uint8(out))
        if pipe.vae is not None:
            with torch.no_grad():
                vae_x = x.to(pipe.device)
                floor.append(_to_uint8(pipe.vae.decode(pipe.vae.encode(vae_x).mode())))
    generated = np.concatenate(outputs)
    judged = score(list(generated), captions)
    border = grow(masks, pipe.vae.downsample_factor if pipe.vae is not None else 1)
    reconstructed = np.concatenate(floor) if floor else None
    result: dict[str, Any] = {
        **{a: judged[a] for a in (*ATTRIBUTES, "full")}, "n": n,
        "kept": kept_pixels(generated, images, masks, tolerance),
        "vae_floor": kept_pixels(reconstructed, images, masks, tolerance) if floor else None,
        "kept_away": kept_pixels(generated, images, border, tolerance),
        "vae_floor_away": kept_pixels(reconstructed, images, border, tolerance) if floor else None,
        "masked_fraction": float(masks.mean()), "tolerance": tolerance, "margin": margin,
        "guidance_scale": pipe.sampling.guidance_scale if guidance_scale is None else guidance_scale,
        "legacy": legacy, "seconds": time.perf_counter() - t0,
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ldm.pipeline import LatentDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--margin", type=float, default=1 / 16, help="mask margin per edge, a fraction of the side")
    p.add_argument("--tolerance", type=float, default=16.0, help="8-bit levels for the kept-pixel fraction")
    p.add_argument("--legacy", action="store_true",
                   help="a text-to-image model with the pipeline's legacy_inpaint blend (the baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        check_counts(n=args.n, batch=args.batch)
        check_mask_settings(args.margin, args.tolerance)
        check_json_out(args.json)
    except ConfigError as err:
        p.error(str(err))  # before the checkpoint loads; exits 2
    try:
        pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
        r = evaluate(pipe, args.n, args.guidance, args.steps, args.sampler, args.seed, args.batch, args.margin,
                     args.tolerance, args.legacy)
    except ConfigError as err:  # a wrong checkpoint or setting: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"inpainting (guidance {r['guidance_scale']:g}{', legacy blend' if r['legacy'] else ''}): {summary(r)}")
    for label, kept, floor in (("unmasked pixels", r["kept"], r["vae_floor"]),
                               ("unmasked, a latent cell from the mask", r["kept_away"], r["vae_floor_away"])):
        line = f"{label}: mean |diff| {kept['mae']:.2f} levels, {kept['within']:.1%} within {r['tolerance']:g}"
        if floor is not None:
            line += f" (VAE reconstruction: {floor['mae']:.2f} levels, {floor['within']:.1%})"
        print(line)
    print(f"{r['masked_fraction']:.1%} of pixels masked")
    if args.json:
        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
