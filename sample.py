"""Generate images from a trained checkpoint.

    python sample.py ckpt=PATH prompt="a red circle in the top left" n=8 steps=25 guidance_scale=5 \
        sampler=dpm_solver++ seed=0 out=samples/
    python sample.py ckpt=PATH prompts_file=prompts.txt
    python sample.py ckpt=PATH prompt="..." init_image=in.png strength=0.6
    python sample.py ckpt=INPAINT prompt="..." init_image=in.png mask=mask.png   # repaint the mask's white region
    python sample.py ckpt=PATH prompt="..." gif=true
    python sample.py ckpt=PATH prompt="..." dtype=bf16 vae_tile_size=32 height=1024 width=1024
    python sample.py ckpt=BASE prompt="..." lora=adapter.safetensors lora_scale=0.8   # a LoRA on a base model
    python sample.py regenerate=samples/00003.json out=again/     # one image again, from its JSON
    python sample.py regenerate=samples/00003.json steps=50 out=again/   # ... with one setting changed
    python sample.py ckpt=CLASS_COND 'prompt=["","",""]' class_label=[0,1,2] n=4   # class-conditional: a class a prompt

Writes one PNG per image with a JSON of every setting beside it, and ``_previews/grid.png`` (with ``gif=true`` the
GIFs too): the folder holds the samples alone for FID, which skips ``_``-named entries. Image i uses seed ``seed + i``
alone, so ``regenerate=<its JSON>`` (its prompt, seed and settings with n=1) gives it again: the same pixels up to
float rounding (batched and single-image kernels may differ in the last bits).
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
from collections.abc import Collection
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ldm.checkpoint import atomic_write_bytes
from ldm.errors import ConfigError
from ldm.eval.generate import make_out_folder, read_captions
from ldm.host_memory import keep_freed_host_memory
from ldm.images import make_grid, to_pil
from ldm.pipeline import LatentDiffusionPipeline

MAX_IMAGES = 1_000_000  # per command: more is a typo in n


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompts: ``prompts_file``'s non-empty lines, or ``prompt`` (one string or a list of strings)."""
    if cfg.prompts_file:
        prompts = read_captions(str(cfg.prompts_file), "prompts_file=")  # UTF-8, whatever the locale
    elif cfg.prompt is not None:
        prompts = [cfg.prompt] if not OmegaConf.is_list(cfg.prompt) else list(cfg.prompt)
        if not prompts:
            raise ConfigError("prompt=[] is empty: give at least one prompt")
    else:
        raise ConfigError('give prompt="..." or prompts_file=PATH')
    for p in prompts:
        if not isinstance(p, str):
            raise ConfigError(f"prompt {p!r} is not text: quote it, e.g. 'prompt=\"{p}\"'")
    return prompts


def save_image(image: Image.Image, path: Path, **params) -> None:
    """``image`` encoded in memory (the format by ``path``'s suffix) and written through a temporary file renamed into
    place: a run interrupted mid-write (Ctrl-C, a kill, a full disk) leaves no truncated PNG or GIF in ``out``."""
    buf = io.BytesIO()
    image.save(buf, format=path.suffix[1:].upper(), **params)
    atomic_write_bytes(path, buf.getvalue(), many=True)


def next_index(out: Path) -> int:
    """One past the largest ``NNNNN.png`` (or ``.json``) index in ``out``; 0 for a folder without samples."""
    taken = [int(f.stem) for f in out.iterdir() if f.suffix in (".png", ".json") and f.stem.isdigit()]
    return max(taken, default=-1) + 1


# JSON field -> config key, for regenerate=PATH
_REGENERATED = {"ckpt": "ckpt", "prompt": "prompt", "seed": "seed", "negative_prompt": "negative_prompt",
                "num_inference_steps": "steps", "guidance_scale": "guidance_scale",
                "guidance_rescale": "guidance_rescale", "guidance_interval": "guidance_interval", "sampler": "sampler",
                "autoguidance_scale": "autoguidance_scale",
                "eta": "eta", "height": "height", "width": "width", "init_image": "init_image", "strength": "strength",
                "use_ema": "use_ema", "dtype": "dtype", "vae_tile_size": "vae_tile_size", "lora": "lora",
                "lora_scale": "lora_scale", "mask": "mask", "legacy_inpaint": "legacy_inpaint",
                "class_label": "class_label"}


def regenerate_config(cfg: DictConfig, given: Collection[str] = ()) -> DictConfig:
    """``cfg`` with the prompt, seed and settings of the image whose JSON is ``cfg.regenerate`` (one image, n=1).

    The settings typed on the command line (``given``: their keys, e.g. ``steps``) win over the JSON's, so an image
    can be sampled again with one setting changed; the JSON's checkpoint is used unless ``ckpt=`` is given; ``out``,
    ``gif`` and ``batch_size`` stay as given.
    """
    path = Path(str(cfg.regenerate))
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"regenerate={path}: no such file (give the JSON written beside an image)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"regenerate={path} is not the JSON written beside an image: {err}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"regenerate={path} is not the JSON written beside an image (a dict of settings)")
    cfg = cfg.copy()
    for field, key in _REGENERATED.items():
        if field not in meta or key in given or (key == "ckpt" and not OmegaConf.is_missing(cfg, "ckpt")):
            continue
        if key in ("strength", "lora_scale") and meta[field] is None:
            continue
        value = meta[field]
        # a recorded text is taken as written: "${...}" in a prompt is no interpolation of the config's
        cfg[key] = value.replace("${", "\\${") if isinstance(value, str) else value
    cfg.prompts_file, cfg.n = None, 1
    return cfg


def _text(cfg: DictConfig, key: str) -> str | None:
    """A text setting (None allowed); a number or a list where text belongs is a ConfigError with the fix."""
    value = cfg[key]
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key} must be text, got {value!r}: quote it, e.g. '{key}=\"{value}\"'")
    return value


def check_config(cfg: DictConfig) -> list[str]:
    """Check the settings that need no checkpoint (counts, seed, flags, paths) and return the prompts.

    Every wrong value is a ConfigError naming the key; nothing is read or written yet but the prompts file.
    """
    for key in ("n", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    for key in ("gif", "use_ema"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{key} must be true or false, got {cfg[key]!r}")
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("give ckpt=PATH: a latent diffusion checkpoint (RUN/ldm/checkpoints/last.ckpt) or an SD "
                          "single file")
    ckpt = _text(cfg, "ckpt")
    if not ckpt or not Path(ckpt).is_file():
        raise ConfigError(f"ckpt={ckpt}: no such file")
    out = _text(cfg, "out")
    if not out:
        raise ConfigError("out must name a folder for the images")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"out={out} is a file: give a folder for the images")
    for key in ("negative_prompt", "init_image", "dtype"):
        _text(cfg, key)
    if cfg.init_image is not None and not Path(cfg.init_image).is_file():
        raise ConfigError(f"init_image={cfg.init_image}: no such file")
    mask = _text(cfg, "mask") if "mask" in cfg else None
    if mask is not None:
        if cfg.init_image is None:
            raise ConfigError("mask=PATH repaints the white region of init_image: give init_image=PATH too")
        if not Path(mask).is_file():
            raise ConfigError(f"mask={mask}: no such file")
    if not isinstance(cfg.get("legacy_inpaint", False), bool):
        raise ConfigError(f"legacy_inpaint must be true or false, got {cfg.legacy_inpaint!r}")
    lora = _text(cfg, "lora")
    if lora is not None and not Path(lora).is_file():
        raise ConfigError(f"lora={lora}: no such file (a LoRA .safetensors, diffusers or kohya format, or a LoRA run's "
                          "checkpoint)")
    scale = cfg.get("lora_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ConfigError(f"lora_scale must be a finite number, got {scale!r}")
    prompts = read_prompts(cfg)
    seed, count = cfg.seed, len(prompts) * cfg.n
    if count > MAX_IMAGES:
        raise ConfigError(f"{len(prompts)} prompts x n={cfg.n} is {count} images, more than {MAX_IMAGES}: lower n")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**64 - count:
        raise ConfigError(f"seed must be an integer in [0, 2**64 - {count}] (image i uses seed + i), got {seed!r}")
    return prompts


def class_labels(cfg: DictConfig, pipe: LatentDiffusionPipeline, prompts: list[str]) -> list[int | None]:
    """The class of each prompt: ``class_label`` (one for every prompt, or a list of one per prompt) for a
    class-conditional checkpoint, None for another. A missing, extra or out-of-range label is a ConfigError."""
    value, num_classes = cfg.get("class_label"), pipe.num_classes
    if num_classes is None:
        if value is not None:
            raise ConfigError(f"class_label={value}: {cfg.ckpt} is not class-conditional (its UNet has no classes); "
                              "drop class_label")
        return [None] * len(prompts)
    if value is None:
        raise ConfigError(f"{cfg.ckpt} is class-conditional ({num_classes} classes): give class_label=K for every "
                          "prompt, or class_label=[K1,K2,...], one per prompt")
    labels = list(value) if OmegaConf.is_list(value) else [value] * len(prompts)
    if len(labels) != len(prompts):
        raise ConfigError(f"class_label holds {len(labels)} labels for {len(prompts)} prompts: give one label, or one "
                          "per prompt")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
            raise ConfigError(f"class_label {label!r} is not a class of {cfg.ckpt}: give integers in [0, "
                              f"{num_classes})")
    return labels


def sample_settings(cfg: DictConfig, pipe: LatentDiffusionPipeline, prompts: list[str]) -> dict:
    """The settings every image of this command samples with: the checkpoint's defaults with ``cfg``'s overrides,
    checked by the pipeline (a ConfigError naming the key), as recorded in each image's JSON."""
    interval = cfg.guidance_interval  # a malformed value reaches the check as the user wrote it
    if OmegaConf.is_list(interval):
        interval = tuple(interval)
    try:
        c = pipe.check_call(prompts, negative_prompt=cfg.negative_prompt, num_inference_steps=cfg.steps,
                            guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
                            sampler=cfg.sampler, eta=cfg.eta, strength=cfg.strength,
                            guidance_rescale=cfg.guidance_rescale, guidance_interval=interval,
                            autoguidance_scale=cfg.get("autoguidance_scale"), dtype=cfg.dtype,
                            vae_tile_size=cfg.vae_tile_size)
    except ConfigError as err:  # the pipeline names its argument; the key typed here is steps
        raise ConfigError(re.sub(r"\bnum_inference_steps\b", "steps", str(err))) from None
    s = c.sampling
    return {
        "ckpt": str(cfg.ckpt), "negative_prompt": cfg.negative_prompt,
        "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
        "guidance_rescale": s.guidance_rescale, "sampler": s.sampler, "eta": c.eta,
        "guidance_interval": None if s.guidance_interval is None else list(s.guidance_interval),
        "autoguidance_scale": c.autoguidance_scale, "height": c.height, "width": c.width,
        "init_image": cfg.init_image, "strength": c.strength if cfg.init_image else None, "use_ema": cfg.use_ema,
        "dtype": cfg.dtype, "vae_tile_size": c.vae_tile_size,
        "lora": cfg.get("lora"), "lora_scale": cfg.get("lora_scale", 1.0) if cfg.get("lora") else None,
        "mask": cfg.get("mask"), "legacy_inpaint": bool(cfg.get("legacy_inpaint", False)),
    }


def run(cfg: DictConfig, given: Collection[str] = ()) -> list[Path]:
    """Sample every prompt ``n`` times; image i uses seed ``seed + i`` alone, whatever the batch size. ``given``: the
    keys typed on the command line (with ``regenerate``, they win over the image's JSON)."""
    if cfg.get("regenerate"):
        cfg = regenerate_config(cfg, given)
    prompts = check_config(cfg)
    init = None
    if cfg.init_image:
        try:
            init = Image.open(cfg.init_image)
            init.load()
        except (OSError, UnidentifiedImageError) as err:
            raise ConfigError(f"init_image={cfg.init_image} is not an image PIL can read: {err}") from None
    mask = None
    if cfg.get("mask"):
        try:
            mask = Image.open(cfg.mask)
            mask.load()
        except (OSError, UnidentifiedImageError) as err:
            raise ConfigError(f"mask={cfg.mask} is not an image PIL can read: {err}") from None
    pipe = LatentDiffusionPipeline.from_checkpoint(cfg.ckpt, use_ema=cfg.use_ema)
    if cfg.get("lora"):
        pipe.load_lora(cfg.lora, scale=float(cfg.get("lora_scale", 1.0)))
    if cfg.get("compile"):
        pipe.compile_unet()
    # the checkpoint's defaults with this command's overrides, checked before the output folder is made
    settings = sample_settings(cfg, pipe, prompts)
    if mask is not None and not pipe.is_inpainting and not settings["legacy_inpaint"]:
        raise ConfigError(f"mask={cfg.mask} needs an inpainting checkpoint (its UNet takes the mask); {cfg.ckpt} is a "
                          "text-to-image model: set legacy_inpaint=true to blend the unmasked region back instead")
    if init is not None and mask is None and pipe.is_inpainting:
        raise ConfigError(f"{cfg.ckpt} is an inpainting model: give mask=PATH with init_image (white = repaint)")
    labelled = list(zip(prompts, class_labels(cfg, pipe, prompts), strict=True))
    jobs = [(p, label, cfg.seed + i) for i, (p, label) in enumerate(x for x in labelled for _ in range(cfg.n))]
    # One generator per image (its initial noise, and its step noise with the stochastic samplers), so any image
    # can be regenerated alone from its JSON: prompt, seed and the settings, with n=1.
    batch = cfg.batch_size
    out = Path(cfg.out)
    make_out_folder(out, "out")
    first = next_index(out)  # an earlier run's images stay: this run's are numbered after them
    if first:
        print(f"note: {out} holds images up to {first - 1:05d}.png from earlier runs; this run's are numbered from "
              f"{first:05d} (give another out= to keep the runs apart, e.g. for FID)", file=sys.stderr)
    previews = out / "_previews"  # the grid and GIFs: not samples (FID skips _-named entries)
    written, images = [], []
    for start in tqdm(range(0, len(jobs), batch), desc="sampling", unit="batch"):
        chunk = jobs[start:start + batch]
        frames: list[list[Image.Image]] = []
        kwargs = dict(negative_prompt=cfg.negative_prompt, num_inference_steps=settings["num_inference_steps"],
                      guidance_scale=settings["guidance_scale"], guidance_rescale=settings["guidance_rescale"],
                      guidance_interval=settings["guidance_interval"],
                      autoguidance_scale=settings["autoguidance_scale"],
                      sampler=settings["sampler"], eta=settings["eta"], height=settings["height"],
                      width=settings["width"], generator=[torch.Generator().manual_seed(seed) for *_, seed in chunk],
                      dtype=cfg.dtype, vae_tile_size=settings["vae_tile_size"])
        if cfg.gif:
            def keep(i, t, x, x0, frames=frames):
                frames.append(to_pil(pipe.decode_latents(x, cfg.vae_tile_size)))  # as the call decodes its result
            kwargs["callback"] = keep
        if init is not None:
            kwargs.update(image=init, strength=settings["strength"])
        if mask is not None:
            kwargs.update(mask_image=mask, legacy_inpaint=settings["legacy_inpaint"])
        if pipe.num_classes is not None:
            kwargs["class_labels"] = [label for _, label, _ in chunk]
        result = pipe([p for p, *_ in chunk], **kwargs)
        for j, ((prompt, label, seed), image) in enumerate(zip(chunk, result, strict=True)):
            idx = first + start + j
            path = out / f"{idx:05d}.png"
            meta = {"prompt": prompt, "seed": seed, "class_label": label, **settings}
            # the settings first: a PNG on disk always has its JSON (to regenerate it)
            atomic_write_bytes(out / f"{idx:05d}.json", json.dumps(meta, indent=2).encode(), many=True)
            save_image(image, path)
            if cfg.gif:
                seq = [frame[j] for frame in frames] + [image] * 5
                save_image(seq[0], previews / f"{idx:05d}.gif", save_all=True, append_images=seq[1:], duration=80,
                           loop=0)
            written.append(path)
            images.append(image)
    save_image(make_grid(images, cols=min(8, len(images))), previews / "grid.png")
    print(f"wrote {len(written)} images and their settings to {out}, and {previews / 'grid.png'}")
    return written


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_host_memory()  # each denoising step reuses the memory the last one freed (no page faults)
    typed = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    try:
        run(cfg, typed)
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
