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
# Stable Diffusion 1.x/2.x train with scaled-linear betas 0.00085..0.012 over 1000 steps (CompVis' "linear").
SD_SCHEDULE = {"schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "rescale_betas_zero_snr": False}
SD_LATENT_SCALE = 0.18215
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
Generators = torch.Generator | Sequence[torch.Generator] | None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``/fp32 -> None (no autocast); bf16/fp16 (names or torch dtypes) -> the torch dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is None or dtype == torch.float32:
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    return dtype


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise on ``device``; with a list of generators, row i is drawn from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: give one per image")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generator])


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
                 prediction_type: str, sampling: dict | None = None, guide_unet: nn.Module | None = None,
                 guide_text_encoder: nn.Module | None = None):
        """``guide_unet`` (and its own ``guide_text_encoder``, else the text encoder's context is shared) is the weak
        model autoguidance guides away from: the snapshot a checkpoint trained with ``guide_snapshot_step`` holds."""
        self.unet, self.text_encoder, self.vae = unet.eval(), text_encoder, vae
        self.guide_unet, self.guide_text_encoder = guide_unet, guide_text_encoder
        for part in (text_encoder, vae, guide_unet, guide_text_encoder):
            if part is not None:
                part.eval()
        self.schedule, self.prediction_type = dict(schedule), prediction_type
        self.sampling = {**DEFAULTS, **(sampling or {})}
        self.downsample_factor = vae.downsample_factor if vae is not None else 1
        self._warned_guidance = False

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> LatentDiffusionPipeline:
        for part in (self.unet, self.text_encoder, self.vae, self.guide_unet, self.guide_text_encoder):
            if part is not None:
                part.to(device)
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = True, map_location: str = "cpu",
                        prediction_type: str | None = None, image_size: int | None = None,
                        text_config: dict | None = None) -> LatentDiffusionPipeline:
        """Load a checkpoint written by ``train.py`` (EMA weights by default) or an original SD single file.

        SD single files (``.ckpt``/``.safetensors``, SD 1.x or 2.x) get SD's schedule (scaled-linear betas
        0.00085..0.012, 1000 steps) and latent scale 0.18215. Their prediction type is not in the weights: it is
        ``epsilon`` unless ``prediction_type`` says otherwise. SD 1.x and SD 2.x-base are ``epsilon``; the 768-px
        SD 2.x models (v2-inference-v) need ``prediction_type="v_prediction"``. ``image_size`` sets their default
        resolution (512, or 768 for v-prediction SD 2.x); ``text_config`` overrides the inferred text-encoder config
        (see ``ldm.convert.load_sd_text_encoder``). For our own checkpoints these three are recorded in the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        sd_options = dict(use_ema=use_ema, prediction_type=prediction_type, image_size=image_size,
                          text_config=text_config)
        if path.suffix == ".safetensors":
            from ldm.convert import read_state_dict

            return cls._from_sd_state_dict(read_state_dict(path), str(path), **sd_options)
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} is not a checkpoint dict")
        if "ldm" not in ckpt:
            if ckpt.get("kind") == "autoencoder":
                raise ValueError(f"{path} is an autoencoder (VAE) checkpoint, not a diffusion model: pass the "
                                 "latent-diffusion checkpoint (ldm/last.ckpt of a training run)")
            state = ckpt.get("state_dict", ckpt)
            if isinstance(state, dict) and any(k.startswith("model.diffusion_model.") for k in state):
                tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
                return cls._from_sd_state_dict(tensors, str(path), **sd_options)
            raise ValueError(f"{path} is neither an ldm training checkpoint nor an SD single-file checkpoint")
        desc, state = ckpt["ldm"], ckpt["state_dict"]
        if prediction_type is not None and prediction_type != desc["prediction_type"]:
            raise ValueError(f"{path} was trained with prediction_type={desc['prediction_type']!r}; "
                             f"prediction_type={prediction_type!r} applies to SD single files only")
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
        sampling = dict(desc.get("sampling") or {})
        if image_size is not None:
            sampling["image_size"] = image_size
        guide_unet = guide_text = None
        guide = desc.get("guide")
        if guide is not None and bool(state.get("guide_taken", False)):  # saved before the snapshot step: no guide
            guide_unet = build_module(desc["unet"])
            _load_prefixed(guide_unet, state, "guide_unet.")
            if guide["text_encoder"]:
                guide_text = build_module(desc["text_encoder"])
                _load_prefixed(guide_text, state, "guide_text_encoder.")
        return cls(unet, text, vae, desc["schedule"], desc["prediction_type"], sampling, guide_unet, guide_text)

    @classmethod
    def _from_sd_state_dict(cls, state: dict[str, torch.Tensor], source: str, use_ema: bool,
                            prediction_type: str | None, image_size: int | None, text_config: dict | None
                            ) -> LatentDiffusionPipeline:
        """An SD 1.x/2.x single-file state dict -> pipeline (UNet, VAE and text encoder inferred from shapes)."""
        from ldm.convert import load_sd_text_encoder, sd_checkpoint_from_state_dict, sd_text_family

        loaded = sd_checkpoint_from_state_dict(state, prefer_ema=use_ema, vae_kwargs={"scale_factor": SD_LATENT_SCALE},
                                               source=source)
        family = sd_text_family(loaded.cond_stage_state_dict)
        if family is None:
            raise ValueError(f"{source} has no text encoder weights in the SD 1.x (cond_stage_model.transformer."
                             "text_model.*) or SD 2.x (cond_stage_model.model.*) layout; cond_stage_model keys found: "
                             f"{sorted(loaded.cond_stage_state_dict)[:3]}")
        text = load_sd_text_encoder(loaded.cond_stage_state_dict, text_config)
        context_dim = loaded.unet.config.get("context_dim")
        if context_dim != text.width:
            raise ValueError(f"{source}: the text encoder is {text.width} wide but the UNet's context_dim is "
                             f"{context_dim}")
        if prediction_type is None:
            if family == "sd2":
                warnings.warn(f"{source} is an SD 2.x checkpoint: its prediction type is not in the weights, "
                              "assuming epsilon (SD 2.x-base); pass prediction_type='v_prediction' for the 768-px "
                              "v models", stacklevel=3)
            prediction_type = "epsilon"
        if image_size is None:
            image_size = 768 if family == "sd2" and prediction_type == "v_prediction" else 512
        return cls(loaded.unet, text, loaded.vae, SD_SCHEDULE, prediction_type, {"image_size": image_size})

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

    def resolve_autoguidance(self, requested: float | None) -> float:
        """The autoguidance scale a call samples with: ``requested``, or the checkpoint's default (None).

        A default this file cannot honour (it holds no guide snapshot: saved before the snapshot step) becomes 1 with
        a warning; an explicit request > 1 without a snapshot raises, naming the fix.
        """
        if requested is None:
            auto = float(self.sampling.get("autoguidance_scale", 1.0))
            if auto != 1.0 and self.guide_unet is None:
                warnings.warn(f"the checkpoint recommends autoguidance_scale={auto} but holds no guide snapshot "
                              "(saved before its snapshot step): sampling without autoguidance", stacklevel=3)
                auto = 1.0
            return auto
        auto = float(requested)
        if auto < 1:
            raise ValueError(f"autoguidance_scale must be >= 1 (1 disables it), got {auto}")
        if auto != 1.0 and self.guide_unet is None:
            raise ValueError(f"autoguidance_scale={auto} needs a guide snapshot, and this checkpoint holds none (train "
                             "with ldm_stage.guide_snapshot_step=N); use autoguidance_scale=1")
        return auto

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
        generator: Generators = None,
        sampler: str | None = None,
        eta: float = 0.0,
        image: Image.Image | torch.Tensor | None = None,
        strength: float = 0.8,
        guidance_rescale: float = 0.0,
        guidance_interval: Sequence[float] | None = None,
        autoguidance_scale: float | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        output_type: str = "pil",
        dtype: torch.dtype | str | None = None,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images; ``None`` arguments take the checkpoint's recommended sampling settings.

        ``generator``: one ``torch.Generator`` for the batch, or a list with one per image (image i's noise then
        comes from generator i alone, so it can be regenerated alone). ``output_type``: ``pil`` (a list of images),
        ``tensor`` ([B, C, H, W] in [-1, 1]) or ``latent``. ``dtype`` bf16/fp16 runs the text encoder and the
        sampler loop under ``torch.autocast`` (the sampler arithmetic stays fp32) and decodes with the VAE in its
        own dtype outside autocast. ``guidance_interval=(lo, hi)`` guides only the steps with lo <= t <= hi
        (training timesteps; see ``sample_loop``); None takes the checkpoint's, and [0, num_train_timesteps] guides
        every step. ``autoguidance_scale`` > 1 also guides away from the checkpoint's guide snapshot at every step
        (Karras et al., 2024; one more UNet pass per step); None takes the checkpoint's, which falls back to 1 with a
        warning when the file holds no guide (saved before its snapshot step). ``vae_tile_size`` (latent pixels)
        decodes overlapping tiles blended over ``vae_tile_overlap`` latent pixels (default min(8, tile // 4)),
        bounding the decoder's memory.
        """
        s = self.sampling
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = num_inference_steps if num_inference_steps is not None else int(s["num_inference_steps"])
        scale = float(s["guidance_scale"] if guidance_scale is None else guidance_scale)
        sampler = sampler or s["sampler"]
        interval = s.get("guidance_interval") if guidance_interval is None else guidance_interval  # sample_loop checks
        size = s.get("image_size", 32)
        height, width = height or size, width or size
        self._check(prompts, scale, strength, steps, height, width, sampler)
        if output_type not in ("pil", "tensor", "latent"):
            raise ValueError(f"output_type must be 'pil', 'tensor' or 'latent', got {output_type!r}")
        if vae_tile_size is not None and vae_tile_size < 1:
            raise ValueError(f"vae_tile_size must be a positive number of latent pixels, got {vae_tile_size}")
        autocast_dtype = resolve_dtype(dtype)
        if self.text_encoder is None and scale != 1.0:
            if not self._warned_guidance:
                warnings.warn(f"this model has no text encoder (unconditional or pixel-space): guidance_scale={scale} "
                              "is ignored, sampling with guidance 1", stacklevel=2)
                self._warned_guidance = True
            scale = 1.0
        auto = self.resolve_autoguidance(autoguidance_scale)
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
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images: give one, or one per image")
        device = self.device
        autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                  enabled=autocast_dtype is not None)

        with autocast:
            context = self._encode_prompts(prompts)
            uncond = self._encode_prompts(negatives) if scale != 1.0 else None
            guide_context = context
            if auto != 1.0 and self.guide_text_encoder is not None:
                guide_context = self.guide_text_encoder.encode(prompts).hidden

        scheduler = make_scheduler(sampler, self.schedule, self.prediction_type)
        scheduler.set_timesteps(steps)
        f = self.downsample_factor
        shape = (n, self.unet.in_channels, height // f, width // f)
        if image is not None:
            x = self._image_tensor(image, height, width)
            z0 = x if self.vae is None else self.vae.normalize_latents(self.vae.encode(x).mode())
            z0 = z0.expand(n, -1, -1, -1) if z0.shape[0] == 1 else z0
            keep = min(steps, max(1, int(round(steps * strength))))
            scheduler.timesteps = scheduler.timesteps[steps - keep:]
            x = scheduler.add_noise(z0, randn(shape, generator, device), scheduler.timesteps[:1].expand(n))
        elif latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            x = latents.to(device)
        else:
            x = randn(shape, generator, device)

        with autocast:
            z = sample_loop(self.unet, scheduler, x, context, uncond, scale, guidance_rescale, eta=eta,
                            generator=generator, callback=callback, guidance_interval=interval,
                            guide=self.guide_unet if auto != 1.0 else None, guide_context=guide_context,
                            autoguidance_scale=auto)
        if output_type == "latent":
            return z
        if self.vae is None:
            images = z.clamp(-1, 1)
        else:
            overlap = min(8, vae_tile_size // 4) if vae_tile_overlap is None and vae_tile_size else vae_tile_overlap
            images = self.vae.decode_latents(z, tile_size=vae_tile_size, tile_overlap=overlap or 0)
        return images.float() if output_type == "tensor" else to_pil(images)
