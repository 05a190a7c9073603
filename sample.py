"""Generate images from a trained checkpoint.

    python sample.py ckpt=PATH prompt="a red circle in the top left" n=8 steps=25 guidance_scale=5 \
        sampler=dpm_solver++ seed=0 out=samples/
    python sample.py ckpt=PATH prompts_file=prompts.txt
    python sample.py ckpt=PATH prompt="..." init_image=in.png strength=0.6
    python sample.py ckpt=PATH prompt="..." gif=true
    python sample.py ckpt=PATH prompt="..." dtype=bf16 vae_tile_size=32 height=1024 width=1024
    python sample.py regenerate=samples/00003.json out=again/     # one image again, from its JSON

Writes one PNG per image with a JSON of every setting beside it, and grid.png. Image i uses seed ``seed + i``
alone, so ``regenerate=<its JSON>`` (its prompt, seed and settings with n=1) gives it again: the same pixels up to
float rounding (batched and single-image kernels may differ in the last bits).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from ldm.errors import ConfigError
from ldm.images import make_grid, to_pil
from ldm.pipeline import LatentDiffusionPipeline


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts_file:
        lines = Path(cfg.prompts_file).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    elif cfg.prompt is not None:
        prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt)
    else:
        raise ConfigError('give prompt="..." or prompts_file=PATH')
    if not prompts:
        raise ConfigError(f"no prompts in {cfg.prompts_file}")
    return prompts


# JSON field -> config key, for regenerate=PATH
_REGENERATED = {"ckpt": "ckpt", "prompt": "prompt", "seed": "seed", "negative_prompt": "negative_prompt",
                "num_inference_steps": "steps", "guidance_scale": "guidance_scale",
                "guidance_rescale": "guidance_rescale", "guidance_interval": "guidance_interval", "sampler": "sampler",
                "autoguidance_scale": "autoguidance_scale",
                "eta": "eta", "height": "height", "width": "width", "init_image": "init_image", "strength": "strength",
                "use_ema": "use_ema", "dtype": "dtype", "vae_tile_size": "vae_tile_size"}


def regenerate_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the prompt, seed and settings of the image whose JSON is ``cfg.regenerate`` (one image, n=1).

    The JSON's checkpoint is used unless ``ckpt=`` is given; ``out``, ``gif`` and ``batch_size`` stay as given.
    """
    meta = json.loads(Path(cfg.regenerate).read_text())
    cfg = cfg.copy()
    for field, key in _REGENERATED.items():
        if field not in meta or (key == "ckpt" and not OmegaConf.is_missing(cfg, "ckpt")):
            continue
        if key == "strength" and meta[field] is None:
            continue
        cfg[key] = meta[field]
    cfg.prompts_file, cfg.n = None, 1
    return cfg


def run(cfg: DictConfig) -> list[Path]:
    """Sample every prompt ``n`` times; image i uses seed ``seed + i`` alone, whatever the batch size."""
    if cfg.get("regenerate"):
        cfg = regenerate_config(cfg)
    for key in ("n", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"out={cfg.out} is a file: give a folder for the images")
    pipe = LatentDiffusionPipeline.from_checkpoint(cfg.ckpt, use_ema=cfg.use_ema)
    prompts = read_prompts(cfg)
    interval = cfg.guidance_interval  # a malformed value reaches the check as the user wrote it
    if OmegaConf.is_list(interval):
        interval = tuple(interval)
    # the checkpoint's defaults with this command's overrides, checked before the output folder is made
    s = pipe.settings(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, sampler=cfg.sampler,
                      guidance_rescale=cfg.guidance_rescale,
                      guidance_interval=interval)
    auto = pipe.resolve_autoguidance(cfg.get("autoguidance_scale"))
    size = s.image_size or 32
    settings = {
        "ckpt": str(cfg.ckpt), "negative_prompt": cfg.negative_prompt,
        "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
        "guidance_rescale": s.guidance_rescale, "sampler": s.sampler, "eta": cfg.eta,
        "guidance_interval": None if s.guidance_interval is None else list(s.guidance_interval),
        "autoguidance_scale": auto,
        "height": size if cfg.height is None else cfg.height, "width": size if cfg.width is None else cfg.width,
        "init_image": cfg.init_image, "strength": cfg.strength if cfg.init_image else None, "use_ema": cfg.use_ema,
        "dtype": cfg.dtype, "vae_tile_size": cfg.vae_tile_size,
    }
    jobs = [(p, cfg.seed + i) for i, p in enumerate(p for p in prompts for _ in range(cfg.n))]
    # One generator per image (its initial noise, and its step noise with the stochastic samplers), so any image
    # can be regenerated alone from its JSON: prompt, seed and the settings, with n=1.
    batch = cfg.batch_size
    init = Image.open(cfg.init_image) if cfg.init_image else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    written, images = [], []
    for start in tqdm(range(0, len(jobs), batch), desc="sampling", unit="batch"):
        chunk = jobs[start:start + batch]
        frames: list[list[Image.Image]] = []
        kwargs = dict(negative_prompt=cfg.negative_prompt, num_inference_steps=settings["num_inference_steps"],
                      guidance_scale=settings["guidance_scale"], guidance_rescale=settings["guidance_rescale"],
                      guidance_interval=settings["guidance_interval"],
                      autoguidance_scale=settings["autoguidance_scale"],
                      sampler=settings["sampler"], eta=cfg.eta, height=settings["height"], width=settings["width"],
                      generator=[torch.Generator().manual_seed(seed) for _, seed in chunk], dtype=cfg.dtype,
                      vae_tile_size=cfg.vae_tile_size)
        if cfg.gif:
            def keep(i, t, x, x0, frames=frames):
                decoded = x if pipe.vae is None else pipe.vae.decode_latents(x, tile_size=cfg.vae_tile_size)
                frames.append(to_pil(decoded))
            kwargs["callback"] = keep
        if init is not None:
            kwargs.update(image=init, strength=cfg.strength)
        result = pipe([p for p, _ in chunk], **kwargs)
        for j, ((prompt, seed), image) in enumerate(zip(chunk, result, strict=True)):
            idx = start + j
            path = out / f"{idx:05d}.png"
            image.save(path)
            meta = {"prompt": prompt, "seed": seed, **settings}
            (out / f"{idx:05d}.json").write_text(json.dumps(meta, indent=2))
            if cfg.gif:
                seq = [frame[j] for frame in frames] + [image] * 5
                seq[0].save(out / f"{idx:05d}.gif", save_all=True, append_images=seq[1:], duration=80, loop=0)
            written.append(path)
            images.append(image)
    make_grid(images, cols=min(8, len(images))).save(out / "grid.png")
    print(f"wrote {len(written)} images, their settings and grid.png to {out}")
    return written


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
