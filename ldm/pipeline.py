"""Inference: text-to-image and image-to-image with classifier-free guidance, from one checkpoint file."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm.checkpoint import build_module
from ldm.lightning.ema import EMA
from ldm.sampling import SAMPLERS, make_scheduler, sample_loop

DEFAULTS = {"guidance_scale": 7.5, "sampler": "dpm_solver++", "num_inference_steps": 25}


def _load_prefixed(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights for {prefix.rstrip('.')} do not fit: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] in [-1, 1] -> PIL images (RGB, or L for one channel)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]


class LatentDiffusionPipeline:
    """Text encoder + UNet + first stage (VAE, or None for pixel models) + a sampler chosen per call."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None, vae: nn.Module | None, schedule: dict,
                 prediction_type: str, sampling: dict | None = None):
        self.unet, self.text_encoder, self.vae = unet.eval(), text_encoder, vae
        if text_encoder is not None:
            text_encoder.eval()
        if vae is not None:
            vae.eval()
        self.schedule, self.prediction_type = dict(schedule), prediction_type
        self.sampling = {**DEFAULTS, **(sampling or {})}
        self.downsample_factor = vae.downsample_factor if vae is not None else 1

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> LatentDiffusionPipeline:
        for part in (self.unet, self.text_encoder, self.vae):
            if part is not None:
                part.to(device)
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = True, map_location: str = "cpu"
                        ) -> LatentDiffusionPipeline:
        """Load a checkpoint written by ``train.py`` (EMA weights by default) or an original SD single file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.suffix == ".safetensors":
            return cls._from_sd_file(path)
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} is not a checkpoint dict")
        if "ldm" not in ckpt:
            if ckpt.get("kind") == "autoencoder":
                raise ValueError(f"{path} is an autoencoder (VAE) checkpoint, not a diffusion model: pass the "
                                 "latent-diffusion checkpoint (ldm/last.ckpt of a training run)")
            if any(k.startswith("model.diffusion_model.") for k in ckpt.get("state_dict", ckpt)):
                return cls._from_sd_file(path)
            raise ValueError(f"{path} is neither an ldm training checkpoint nor an SD single-file checkpoint")
        desc, state = ckpt["ldm"], ckpt["state_dict"]
        unet = build_module(desc["unet"])
        _load_prefixed(unet, state, "unet.")
        if use_ema and desc.get("ema"):
            ema = EMA(unet, decay=0.0, warmup=False)
            _load_prefixed(ema, state, "ema.")
            ema.copy_to(unet)
        text = None
        if desc["text_encoder"] is not None:
            text = build_module(desc["text_encoder"])
            _load_prefixed(text, state, "text_encoder.")
        vae = None
        if desc["first_stage"] is not None:
            vae = build_module(desc["first_stage"])
            _load_prefixed(vae, state, "first_stage.")
        return cls(unet, text, vae, desc["schedule"], desc["prediction_type"], desc.get("sampling"))

    @classmethod
    def _from_sd_file(cls, path: Path) -> LatentDiffusionPipeline:
        from ldm.convert import load_sd_checkpoint

        loaded = load_sd_checkpoint(path)
        raise NotImplementedError(
            f"{path}: the SD single-file UNet and VAE load ({type(loaded).__name__}), but its text encoder needs a "
            "local CLIP config; build the pipeline with LatentDiffusionPipeline(unet, text_encoder, vae, ...)"
        )

    # ------------------------------------------------------------------ inputs

    def _check(self, prompts: list[str], guidance_scale: float, strength: float, steps: int, height: int,
               width: int, sampler: str) -> None:
        if not prompts:
            raise ValueError("prompt is an empty list: give at least one prompt")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        T = self.schedule.get("num_train_timesteps", 1000)
        if not 1 <= steps <= T:
            raise ValueError(f"num_inference_steps must lie in [1, {T}] (the training timesteps), got {steps}")
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the model's downsampling factor {f}, got "
                             f"{height}x{width}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")

    def _image_tensor(self, image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image[None]
        else:
            channels = self.unet.in_channels if self.vae is None else self.vae.config["in_channels"]
            mode = "L" if channels == 1 else "RGB"
            if image.mode != mode:
                warnings.warn(f"init image has mode {image.mode}; converted to {mode}", stacklevel=3)
                image = image.convert(mode)
            if image.size != (width, height):
                warnings.warn(f"init image is {image.size[0]}x{image.size[1]}; resized to {width}x{height}",
                              stacklevel=3)
                image = image.resize((width, height), Image.BICUBIC)
            arr = np.asarray(image, dtype=np.float32) / 127.5 - 1
            x = torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1)[None]
        return x.to(self.device)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor | None:
        return None if self.text_encoder is None else self.text_encoder.encode(prompts).hidden

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        image: Image.Image | torch.Tensor | None = None,
        strength: float = 0.8,
        guidance_rescale: float = 0.0,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        output_type: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images; ``None`` arguments take the checkpoint's recommended sampling settings.

        ``output_type``: ``pil`` (a list of images), ``tensor`` ([B, C, H, W] in [-1, 1]) or ``latent``.
        """
        s = self.sampling
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = num_inference_steps if num_inference_steps is not None else int(s["num_inference_steps"])
        scale = float(s["guidance_scale"] if guidance_scale is None else guidance_scale)
        sampler = sampler or s["sampler"]
        size = s.get("image_size", 32)
        height, width = height or size, width or size
        self._check(prompts, scale, strength, steps, height, width, sampler)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        if negative_prompt is None:
            negatives = [""] * n
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * n
        else:
            negatives = [p for p in negative_prompt for _ in range(num_images_per_prompt)]
            if len(negatives) != n:
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {n // num_images_per_prompt} "
                                 "prompts; give one, or one per prompt")
        context = self._encode_prompts(prompts)
        uncond = self._encode_prompts(negatives) if scale != 1.0 else None

        scheduler = make_scheduler(sampler, self.schedule, self.prediction_type)
        scheduler.set_timesteps(steps)
        f = self.downsample_factor
        shape = (n, self.unet.in_channels, height // f, width // f)
        device = self.device
        gen_device = generator.device if generator is not None else device
        if image is not None:
            x = self._image_tensor(image, height, width)
            z0 = x if self.vae is None else self.vae.normalize_latents(self.vae.encode(x).mode())
            z0 = z0.expand(n, -1, -1, -1) if z0.shape[0] == 1 else z0
            keep = min(steps, max(1, int(round(steps * strength))))
            scheduler.timesteps = scheduler.timesteps[steps - keep:]
            noise = torch.randn(shape, generator=generator, device=gen_device).to(device)
            x = scheduler.add_noise(z0, noise, scheduler.timesteps[:1].expand(n))
        elif latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            x = latents.to(device)
        else:
            x = torch.randn(shape, generator=generator, device=gen_device).to(device)

        z = sample_loop(self.unet, scheduler, x, context, uncond, scale, guidance_rescale, eta=eta,
                        generator=generator, callback=callback)
        if output_type == "latent":
            return z
        images = z.clamp(-1, 1) if self.vae is None else self.vae.decode_latents(z)
        return images.float() if output_type == "tensor" else to_pil(images)
