"""Make the pictures of docs/sampling.md from a trained checkpoint (the quickstart model).

    python docs/figures/make_sampling_figures.py CKPT [--out docs/figures]

Writes sampling_guidance.png (rows: prompts, columns: guidance 1, 3, 5, 7.5), sampling_steps.png (rows: samplers,
columns: step counts), sampling_img2img.png (the init image, then strengths 0.2 .. 1.0) and
sampling_negative.png (without and with a negative prompt). Every image uses a fixed seed, so reruns match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ldm.data.builtin.shapes import ShapesDataset
from ldm.pipeline import LatentDiffusionPipeline

PROMPTS = ["a red circle in the top left", "a blue square in the center", "a yellow triangle in the bottom right",
           "a purple circle in the bottom left"]
GUIDANCE = [1.0, 3.0, 5.0, 7.5]
SAMPLER_STEPS = {"ddpm": [10, 25, 50, 100], "ddim": [5, 10, 25, 50], "dpm_solver++": [5, 10, 20, 25]}
STRENGTHS = [0.2, 0.4, 0.6, 0.8, 1.0]
SCALE = 3  # upscale the 32 px images so the grids are readable


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Tile images into a grid with a text label per row (left) and per column (top)."""
    w, h = rows[0][0].size
    left, top = 180, 18
    grid = Image.new("RGB", (left + w * len(col_labels), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((left + j * w + 4, 3), label, fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        draw.text((4, top + i * h + h // 2 - 6), label, fill="black")
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB"), (left + j * w, top + i * h))
    return grid


def big(im: Image.Image) -> Image.Image:
    return im.resize((im.width * SCALE, im.height * SCALE), Image.NEAREST)


def one(pipe: LatentDiffusionPipeline, prompt: str, seed: int, **kwargs) -> Image.Image:
    return big(pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)[0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--out", default="docs/figures")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)

    rows = [[one(pipe, prompt, seed=i, guidance_scale=g) for g in GUIDANCE] for i, prompt in enumerate(PROMPTS)]
    labelled_grid(rows, PROMPTS, [f"guidance {g:g}" for g in GUIDANCE]).save(out / "sampling_guidance.png")

    prompt = PROMPTS[2]
    rows, labels = [], []
    for sampler, steps in SAMPLER_STEPS.items():
        rows.append([one(pipe, prompt, seed=0, sampler=sampler, num_inference_steps=n) for n in steps])
        labels.append(f"{sampler}: " + ", ".join(map(str, steps)))
    labelled_grid(rows, labels, ["fewest steps", "", "", "most steps"]).save(out / "sampling_steps.png")

    init = ShapesDataset(size=pipe.sampling.image_size or 32, seed=7, length=1)[0]
    targets = ["a green square in the top right", "a white triangle in the center"]
    rows = [[big(init["image"])] + [one(pipe, t, seed=0, image=init["image"], strength=s) for s in STRENGTHS]
            for t in targets]
    labelled_grid(rows, [f"-> {t}" for t in targets],
                  ["init: " + init["caption"][2:20]] + [f"strength {s:g}" for s in STRENGTHS]
                  ).save(out / "sampling_img2img.png")

    cases = [("a circle in the center", "a red circle in the center"),
             ("a red shape in the top left", "a red circle in the top left")]
    rows = []
    for prompt, neg in cases:
        plain = [one(pipe, prompt, seed=s) for s in range(3)]
        rows.append(plain + [one(pipe, prompt, seed=s, negative_prompt=neg) for s in range(3)])
    labelled_grid(rows, [f"{p} / not: {n}" for p, n in cases],
                  ["seed 0", "seed 1", "seed 2", "neg, seed 0", "neg, seed 1", "neg, seed 2"]
                  ).save(out / "sampling_negative.png")
    print(f"wrote {out}/sampling_{{guidance,steps,img2img,negative}}.png")


if __name__ == "__main__":
    main()
