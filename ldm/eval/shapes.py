"""The shapes judge: read colour, shape and position back from the pixels of generated images.

    python -m ldm.eval.shapes CKPT [--n 500] [--guidance 1 3 5] [--steps N] [--sampler NAME]
        [--guidance-interval LO HI] [--colors C ...] [--palette C ...] [--lora FILE] [--json OUT]

It samples random captions of the ``shapes`` grammar, generates one image per caption, and reports per-attribute
and full-match accuracy for each guidance scale, plus the VAE's reconstruction PSNR on held-out dataset images and
the same accuracy on its reconstructions of them (what the first stage alone loses).
``--colors`` draws the captions' colours from another list (e.g. ``cyan``, an extra colour a LoRA taught); the
colours read back are the seven, those and ``--palette``'s.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ldm.data.builtin.shapes import BACKGROUND, COLORS, PALETTE, POSITIONS, ShapesDataset, caption_for, check_colors
from ldm.errors import ConfigError
from ldm.eval.generate import check_json_out, judge_samples, write_json

ATTRIBUTES = ("color", "shape", "position")


@dataclass
class Reading:
    color: str | None
    shape: str | None
    position: str | None


def read_image(image: np.ndarray, threshold: float = 60.0,
               palette: Mapping[str, tuple[int, int, int]] = COLORS) -> Reading:
    """Classify one RGB uint8 image [H, W, 3]; the colour is the nearest of ``palette``'s.

    Two passes: pixels more than ``threshold`` from the background colour give the shape's colour (their median);
    then the foreground is every pixel nearer that colour than the background (past half the distance between them,
    and at least ``threshold``). So a faint fringe around a bright shape, as a decoder's ringing leaves it, does not
    count as shape: with the first pass alone, white squares with a 1-px fringe at a quarter of their contrast read
    as circles.
    """
    arr = image.astype(np.float32)
    background = np.array(BACKGROUND, dtype=np.float32)
    dist = np.linalg.norm(arr - background, axis=-1)
    mask = dist > threshold
    if mask.sum() < 4:
        return Reading(None, None, None)
    size = image.shape[0]
    median = np.median(arr[mask], axis=0)
    color = min(palette, key=lambda c: float(np.sum((median - np.array(palette[c])) ** 2)))
    mask = dist > max(threshold, 0.5 * float(np.linalg.norm(median - background)))
    if mask.sum() < 4:
        return Reading(color, None, None)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    # Shape from the silhouette: a triangle (apex up) is narrow at the top, a square fills its box.
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box = mask[y0:y1 + 1, x0:x1 + 1]
    fill = box.mean()
    widths = box.sum(axis=1).astype(np.float32)
    q = max(1, len(widths) // 4)
    top, bottom = widths[:q].mean(), widths[-q:].mean()
    if top < 0.6 * bottom:
        shape = "triangle"
    elif fill >= 0.87:
        shape = "square"
    else:
        shape = "circle"
    return Reading(color, shape, position)


def parse_caption(caption: str) -> Reading:
    """Invert the caption grammar ``a {color} {shape} in the {position}``."""
    words = caption.split(" in the ")
    _, color, shape = words[0].split(" ", 2)
    return Reading(color, shape, words[1])


def score(images: list[np.ndarray], captions: list[str],
          palette: Mapping[str, tuple[int, int, int]] = COLORS) -> dict[str, float]:
    """Per-attribute and full-match accuracy of ``images`` against the captions they were generated from."""
    hits = {a: 0 for a in ATTRIBUTES}
    full = 0
    for image, caption in zip(images, captions, strict=True):
        got, want = read_image(image, palette=palette), parse_caption(caption)
        ok = [getattr(got, a) == getattr(want, a) for a in ATTRIBUTES]
        for a, o in zip(ATTRIBUTES, ok, strict=True):
            hits[a] += o
        full += all(ok)
    n = len(captions)
    return {**{a: hits[a] / n for a in ATTRIBUTES}, "full": full / n, "n": n}


def summary(r: dict) -> str:
    """One line of a score dict: full match and each attribute, n and seconds."""
    return (f"full {r['full']:.1%}  color {r['color']:.1%}  shape {r['shape']:.1%}  position {r['position']:.1%}  "
            f"(n={r['n']}, {r['seconds']:.0f}s)")


def random_captions(n: int, seed: int, colors: Sequence[str] | None = None) -> list[str]:
    """``n`` captions of uniformly drawn attributes, colours from ``colors`` (None: the seven)."""
    rng = random.Random(seed)
    colors = list(check_colors(colors))
    return [caption_for(rng.choice(colors), rng.choice(["circle", "square", "triangle"]),
                        rng.choice(list(POSITIONS))) for _ in range(n)]


def judge_palette(*color_lists: Sequence[str] | None) -> dict[str, tuple[int, int, int]]:
    """The colours the judge reads: the seven, plus every colour in ``color_lists``."""
    names = list(COLORS) + [c for colors in color_lists if colors for c in check_colors(colors)]
    return {c: PALETTE[c] for c in dict.fromkeys(names)}


def held_out_images(size: int, n: int, seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[str]]:
    """``n`` shapes images [n, 3, size, size] in [-1, 1] drawn with ``seed`` (not the training set's), and captions."""
    items = list(ShapesDataset(size=size, seed=seed, length=n))
    x = torch.stack([torch.from_numpy(np.asarray(d["image"], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                     for d in items])
    return x.to(device), [d["caption"] for d in items]


def reconstruct(vae: torch.nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """The VAE's reconstructions (posterior mode) of images ``x`` in [-1, 1], clamped to that range."""
    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(b).mode()).clamp(-1, 1) for b in x.split(batch)])


def vae_psnr(vae: torch.nn.Module, size: int, n: int = 256, seed: int = 12345) -> float:
    """Mean PSNR (dB, images in [0, 1]) of VAE reconstructions (posterior mode) of held-out shapes images."""
    x, _ = held_out_images(size, n, seed, next(vae.parameters()).device)
    rec = reconstruct(vae, x, batch=64)
    mse = (((rec - x) / 2) ** 2).mean(dim=(1, 2, 3)).clamp(min=1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def vae_reconstructions(vae: torch.nn.Module, size: int, n: int = 1000, seed: int = 12345,
                        palette: Mapping[str, tuple[int, int, int]] = COLORS) -> dict[str, float]:
    """The judge's accuracy on VAE reconstructions (posterior mode) of ``n`` held-out shapes images: what the first
    stage alone loses. Dataset images read 100%, so a miss here is the VAE's alone; the LDM's figure can still be
    several points lower on a VAE that reads 100% (docs/evaluation.md)."""
    x, captions = held_out_images(size, n, seed, next(vae.parameters()).device)
    t0 = time.perf_counter()
    rec = reconstruct(vae, x)
    images = ((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return {**score(list(images), captions, palette), "seconds": time.perf_counter() - t0}


def check_counts(**counts: int) -> None:
    """A judge's image count and batch size must be positive integers (``--n``, ``--batch``)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


def evaluate(pipe, n: int = 500, guidance_scales=(None,), steps: int | None = None, sampler: str | None = None,
             seed: int = 0, batch: int = 100, guidance_interval: tuple[float, float] | None = None,
             autoguidance_scale: float | None = None, colors: Sequence[str] | None = None,
             palette: Sequence[str] | None = None) -> dict:
    """Generate ``n`` images per guidance scale (None = the checkpoint's default) and score them.

    ``guidance_interval`` and ``autoguidance_scale`` None sample with the checkpoint's. ``colors`` are the captions'
    colours (None: the seven); the judge reads the seven, ``colors`` and ``palette``.
    """
    check_counts(n=n, batch=batch)
    captions = random_captions(n, seed, colors)
    read = judge_palette(colors, palette)
    results = {}
    for scale in guidance_scales:
        t0 = time.perf_counter()
        samples = judge_samples(pipe, captions, seed=seed, batch_size=batch, guidance_scale=scale,
                                num_inference_steps=steps, sampler=sampler, guidance_interval=guidance_interval,
                                autoguidance_scale=autoguidance_scale)
        images = list(samples.permute(0, 2, 3, 1).numpy())
        label = pipe.sampling.guidance_scale if scale is None else scale
        results[f"guidance_{label:g}"] = {**score(images, captions, read), "seconds": time.perf_counter() - t0}
    if pipe.vae is not None:
        results["vae_psnr_db"] = vae_psnr(pipe.vae, pipe.sampling.image_size or 32)
        results["vae_reconstruction"] = vae_reconstructions(pipe.vae, pipe.sampling.image_size or 32)
    return results


def main(argv: list[str] | None = None) -> dict:
    from ldm.pipeline import LatentDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--guidance", type=float, nargs="*", default=None,
                   help="guidance scales to test (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only the steps with LO <= t <= HI (default: the checkpoint's)")
    p.add_argument("--autoguidance", type=float, default=None,
                   help="autoguidance scale (1 = off; default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--colors", nargs="+", default=None,
                   help="the captions' colours (default: the seven; extra: cyan)")
    p.add_argument("--palette", nargs="+", default=None, help="extra colours the judge also reads (e.g. cyan)")
    p.add_argument("--lora", default=None, help="a LoRA file or LoRA run checkpoint to apply to CKPT")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (pays for many images; kernels cached under $LDM_CACHE/inductor)")
    args = p.parse_args(argv)
    try:
        check_counts(n=args.n, batch=args.batch)
        check_json_out(args.json)
    except ConfigError as err:
        p.error(str(err))  # before the checkpoint loads; exits 2
    try:
        pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
        if args.lora:
            pipe.load_lora(args.lora, scale=args.lora_scale)
        if args.compile:
            pipe.compile_unet()
        scales = tuple(args.guidance) if args.guidance else (None,)
        results = evaluate(pipe, args.n, scales, args.steps, args.sampler, args.seed, args.batch,
                           args.guidance_interval, args.autoguidance, args.colors, args.palette)
    except ConfigError as err:  # a wrong checkpoint or setting: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for key, r in results.items():
        if isinstance(r, dict):
            print(f"{key}: {summary(r)}")
        elif not math.isnan(r):
            print(f"{key}: {r:.2f}")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    from ldm.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # the sampling steps reuse freed memory (no page faults)
    main()
