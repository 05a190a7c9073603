"""The one generation path: text-to-image and image-to-image with classifier-free guidance (and autoguidance),
used by ``sample.py``, the training sample grids and the judges."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm.checkpoint import ModelParts, load_parts
from ldm.diffusion.guidance import AutoGuidance, ClassifierFreeGuidance
from ldm.diffusion.sampling import SAMPLERS, Generators, SamplingDefaults, make_scheduler, randn, sample_loop
from ldm.errors import ConfigError
from ldm.images import to_pil

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
OUTPUT_TYPES = ("pil", "tensor", "latent")


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


def _interval(value):
    """A list or tuple as a tuple (SamplingDefaults' type); anything else as given, for its check to name."""
    return tuple(value) if isinstance(value, list | tuple) else value


class LatentDiffusionPipeline:
    """Text encoder + UNet + first stage (VAE, or None for pixel models) + a sampler chosen per call.

    The parts may be borrowed from a training run: a call switches them to eval mode for its duration only and
    leaves their weights alone. ``guide_unet`` (and its own ``guide_text_encoder``, else the text encoder's context
    is shared) is the weak model autoguidance guides away from.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None, vae: nn.Module | None, schedule: dict,
                 prediction_type: str, sampling: SamplingDefaults | dict | None = None,
                 guide_unet: nn.Module | None = None, guide_text_encoder: nn.Module | None = None):
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.guide_unet, self.guide_text_encoder = guide_unet, guide_text_encoder
        self.schedule, self.prediction_type = dict(schedule), prediction_type
        if not isinstance(sampling, SamplingDefaults):
            sampling = SamplingDefaults.from_dict(sampling)
        self.sampling = sampling
        self.downsample_factor = vae.downsample_factor if vae is not None else 1
        self._warned_guidance = False

    @property
    def parts(self) -> list[nn.Module]:
        """The modules the pipeline runs (those it holds)."""
        return [p for p in (self.unet, self.text_encoder, self.vae, self.guide_unet, self.guide_text_encoder)
                if p is not None]

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are: inputs and noise go there."""
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> LatentDiffusionPipeline:
        """Move every part to ``device``; returns the pipeline."""
        for part in self.parts:
            part.to(device)
        return self

    @classmethod
    def from_parts(cls, parts: ModelParts) -> LatentDiffusionPipeline:
        """A pipeline over what ``ldm.checkpoint.load_parts`` returned."""
        return cls(parts.unet, parts.text_encoder, parts.first_stage, parts.schedule, parts.prediction_type,
                   parts.sampling, parts.guide_unet, parts.guide_text_encoder)

    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = True, map_location: str = "cpu",
                        prediction_type: str | None = None, image_size: int | None = None,
                        text_config: dict | None = None) -> LatentDiffusionPipeline:
        """Load an ldm checkpoint (EMA weights by default) or an original SD single file: see
        :func:`ldm.checkpoint.load_parts` for the arguments."""
        return cls.from_parts(load_parts(path, use_ema=use_ema, map_location=map_location,
                                         prediction_type=prediction_type, image_size=image_size,
                                         text_config=text_config))

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the call, then each part's own mode back (a training run's modules stay in training)."""
        modes = {m: m.training for p in self.parts for m in p.modules()}
        for p in self.parts:
            p.eval()
        try:
            yield
        finally:
            for m, mode in modes.items():
                m.training = mode

    # ------------------------------------------------------------------ inputs

    def _check(self, prompts: list[str], s: SamplingDefaults, strength: float, height: int, width: int) -> None:
        try:
            self._check_values(prompts, s, strength, height, width)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_values(self, prompts: list[str], s: SamplingDefaults, strength: float, height: int, width: int) -> None:
        if not prompts:
            raise ValueError("prompt is an empty list: give at least one prompt")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        T = self.schedule.get("num_train_timesteps", 1000)
        if not 1 <= s.num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must lie in [1, {T}] (the training timesteps), got "
                             f"{s.num_inference_steps}")
        f = self.downsample_factor
        if height < 1 or width < 1 or height % f or width % f:
            raise ValueError(f"height and width must be positive multiples of the model's downsampling factor {f}, "
                             f"got {height}x{width}")

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
            auto = self.sampling.autoguidance_scale
            if auto != 1.0 and self.guide_unet is None:
                warnings.warn(f"the checkpoint recommends autoguidance_scale={auto} but holds no guide snapshot "
                              "(saved before its snapshot step): sampling without autoguidance", stacklevel=3)
                auto = 1.0
            return auto
        auto = float(requested)
        if not math.isfinite(auto) or auto < 1:
            raise ValueError(f"autoguidance_scale must be >= 1 (1 disables it), got {auto}")
        if auto != 1.0 and self.guide_unet is None:
            raise ValueError(f"autoguidance_scale={auto} needs a guide snapshot, and this checkpoint holds none (train "
                             "with ldm_stage.guide_snapshot_step=N); use autoguidance_scale=1")
        return auto

    def settings(self, **overrides) -> SamplingDefaults:
        """The checkpoint's sampling defaults with a call's overrides (None keeps the default), checked."""
        return self.sampling.with_overrides(**overrides)

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
        guidance_rescale: float | None = None,
        guidance_interval: Sequence[float] | None = None,
        autoguidance_scale: float | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        output_type: str = "pil",
        dtype: torch.dtype | str | None = None,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images. Every ``None`` takes the checkpoint's sampling default (:class:`SamplingDefaults`).

        Args:
            prompt: one prompt or a list; each gives ``num_images_per_prompt`` images.
            negative_prompt: the prompt guidance moves away from ("" when None): one, or one per prompt.
            num_inference_steps: sampler steps, in [1, num_train_timesteps].
            guidance_scale: classifier-free guidance scale (1 = none). Ignored, with a warning, by a model
                without a text encoder.
            height, width: in pixels, multiples of the first stage's downsampling factor.
            generator: one ``torch.Generator`` for the batch, or one per image (image i's noise then comes from
                generator i alone, so it can be regenerated alone).
            sampler: ``ddpm``, ``ddim`` or ``dpm_solver++``; ``eta`` is DDIM's noise (0 = deterministic).
            image, strength: image-to-image: start from ``image`` noised to the fraction ``strength`` of the steps.
            guidance_rescale: blend of the std-rescaled guided output (Lin et al., 2023), in [0, 1].
            guidance_interval: ``(lo, hi)``: guide only the steps with lo <= t <= hi (training timesteps).
            autoguidance_scale: > 1 also guides away from the checkpoint's guide snapshot (one more UNet pass per
                step); a default the file cannot honour falls back to 1 with a warning.
            latents: the initial noise, of shape [B, C, H / f, W / f], instead of drawing it.
            class_labels: [B] class indices for a class-conditional UNet.
            callback: ``callback(i, t, latents, x0_prediction)`` after each step.
            output_type: ``pil`` (a list of images), ``tensor`` ([B, C, H, W] in [-1, 1]) or ``latent``.
            dtype: bf16/fp16 runs the text encoder and the UNet under ``torch.autocast`` (the sampler arithmetic
                stays fp32); the VAE decodes outside autocast.
            vae_tile_size, vae_tile_overlap: decode overlapping tiles of this many latent pixels, blended over the
                overlap (default min(8, tile // 4)), bounding the decoder's memory.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        s = self.settings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                          guidance_rescale=guidance_rescale,
                          guidance_interval=_interval(guidance_interval))
        size = s.image_size or 32
        height = size if height is None else height
        width = size if width is None else width
        self._check(prompts, s, strength, height, width)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if vae_tile_size is not None and vae_tile_size < 1:
            raise ValueError(f"vae_tile_size must be a positive number of latent pixels, got {vae_tile_size}")
        autocast_dtype = resolve_dtype(dtype)
        scale = s.guidance_scale
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
        with self._eval_mode():
            with autocast:
                context = self._encode_prompts(prompts)
                uncond = self._encode_prompts(negatives) if scale != 1.0 else None
                guide_context = None
                if auto != 1.0 and self.guide_text_encoder is not None:
                    guide_context = self.guide_text_encoder.encode(prompts).hidden
            guidance = ClassifierFreeGuidance(scale, uncond, s.guidance_rescale, s.guidance_interval)
            if auto != 1.0:
                guidance = AutoGuidance(self.guide_unet, auto, guide_context, cfg=guidance)

            scheduler = make_scheduler(s.sampler, self.schedule, self.prediction_type)
            scheduler.set_timesteps(s.num_inference_steps)
            f = self.downsample_factor
            shape = (n, self.unet.in_channels, height // f, width // f)
            if image is not None:
                x = self._image_tensor(image, height, width)
                z0 = x if self.vae is None else self.vae.normalize_latents(self.vae.encode(x).mode())
                z0 = z0.expand(n, -1, -1, -1) if z0.shape[0] == 1 else z0
                steps = s.num_inference_steps
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
                z = sample_loop(self.unet, scheduler, x, context, guidance, eta=eta, generator=generator,
                                callback=callback, y=None if class_labels is None else class_labels.to(device))
            if output_type == "latent":
                return z
            if self.vae is None:
                images = z.clamp(-1, 1)
            else:
                tile = vae_tile_size
                overlap = min(8, tile // 4) if vae_tile_overlap is None and tile else vae_tile_overlap
                images = self.vae.decode_latents(z.to(next(self.vae.parameters()).dtype), tile_size=tile,
                                                 tile_overlap=overlap or 0)
        return images.float() if output_type == "tensor" else to_pil(images)


__all__ = ["SAMPLERS", "LatentDiffusionPipeline", "resolve_dtype"]
