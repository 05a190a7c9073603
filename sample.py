"""Generate images from a trained checkpoint.

    python sample.py ckpt=PATH prompt="a red circle in the top left" n=8 steps=25 guidance_scale=5 \
        sampler=dpm_solver++ seed=0 out=samples/
    python sample.py ckpt=PATH prompts_file=prompts.txt
    python sample.py ckpt=PATH prompt="..." init_image=in.png strength=0.6
    python sample.py ckpt=PATH prompt="..." gif=true

Writes one PNG per image with a JSON of every setting beside it (enough to regenerate it), and grid.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from ldm.lightning.callbacks import make_grid
from ldm.pipeline import LatentDiffusionPipeline, to_pil

STOCHASTIC = {"ddpm"}


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts_file:
        lines = Path(cfg.prompts_file).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    elif cfg.prompt is not None:
        prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt)
    else:
        raise ValueError('give prompt="..." or prompts_file=PATH')
    if not prompts:
        raise ValueError(f"no prompts in {cfg.prompts_file}")
    return prompts


def run(cfg: DictConfig) -> list[Path]:
    pipe = LatentDiffusionPipeline.from_checkpoint(cfg.ckpt, use_ema=cfg.use_ema)
    s = pipe.sampling
    prompts = read_prompts(cfg)
    settings = {
        "ckpt": str(cfg.ckpt), "negative_prompt": cfg.negative_prompt,
        "num_inference_steps": cfg.steps or s["num_inference_steps"],
        "guidance_scale": s["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale,
        "guidance_rescale": cfg.guidance_rescale, "sampler": cfg.sampler or s["sampler"], "eta": cfg.eta,
        "height": cfg.height or s.get("image_size"), "width": cfg.width or s.get("image_size"),
        "init_image": cfg.init_image, "strength": cfg.strength if cfg.init_image else None, "use_ema": cfg.use_ema,
    }
    jobs = [(p, cfg.seed + i) for i, p in enumerate(p for p in prompts for _ in range(cfg.n))]
    # Each image starts from its own seed's noise, so any one can be regenerated alone. Stochastic samplers also
    # draw noise during the loop: those run one image at a time.
    stochastic = settings["sampler"] in STOCHASTIC or (settings["sampler"] == "ddim" and cfg.eta > 0)
    batch = 1 if stochastic else max(1, cfg.batch_size)
    init = Image.open(cfg.init_image) if cfg.init_image else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    f = pipe.downsample_factor
    shape = (pipe.unet.in_channels, settings["height"] // f, settings["width"] // f)
    written, images = [], []
    for start in tqdm(range(0, len(jobs), batch), desc="sampling", unit="batch"):
        chunk = jobs[start:start + batch]
        frames: list[list[Image.Image]] = []
        kwargs = dict(negative_prompt=cfg.negative_prompt, num_inference_steps=settings["num_inference_steps"],
                      guidance_scale=settings["guidance_scale"], guidance_rescale=cfg.guidance_rescale,
                      sampler=settings["sampler"], eta=cfg.eta, height=settings["height"], width=settings["width"],
                      generator=torch.Generator().manual_seed(chunk[0][1]))
        if cfg.gif:
            def keep(i, t, x, x0, frames=frames):
                decoded = x if pipe.vae is None else pipe.vae.decode_latents(x)
                frames.append(to_pil(decoded))
            kwargs["callback"] = keep
        if init is not None:
            kwargs.update(image=init, strength=cfg.strength)
        else:
            kwargs["latents"] = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                             for _, seed in chunk])
        result = pipe([p for p, _ in chunk], **kwargs)
        for j, ((prompt, seed), image) in enumerate(zip(chunk, result, strict=True)):
            idx = start + j
            path = out / f"{idx:05d}.png"
            image.save(path)
            meta = {"prompt": prompt, "seed": seed, **settings}
            if stochastic or init is not None:
                meta["generator_seed"] = chunk[0][1]
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
    run(cfg)


if __name__ == "__main__":
    main()
