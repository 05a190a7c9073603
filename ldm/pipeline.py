"""The one generation path: text-to-image, image-to-image and inpainting with classifier-free guidance (and
autoguidance), used by ``sample.py``, the training sample grids and the judges."""

from __future__ import annotations

import numbers
import reprlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldm.checkpoint import ModelParts, load_parts
from ldm.compiling import compile_in_place
from ldm.data.masks import binarize, latent_mask, masked_image
from ldm.data.transforms import eight_bit
from ldm.diffusion.guidance import AutoGuidance, ClassifierFreeGuidance
from ldm.diffusion.sampling import (
    SAMPLERS,
    Generators,
    SamplingDefaults,
    check_int,
    check_real,
    check_sampler,
    default_sampler,
    forward_noise,
    make_scheduler,
    noise_to_start,
    randn,
    sample_loop,
    set_steps,
    start_at,
    strength_steps,
)
from ldm.errors import ConfigError
from ldm.images import to_pil
from ldm.nn.attention import reuse_context_projections
from ldm.unet import UNet

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
OUTPUT_TYPES = ("pil", "tensor", "latent")
MAX_SIDE = 16384  # pixels: a larger height or width is a typo, and more memory than a device holds
MAX_BATCH = 4096  # images in one call: more is a typo (sample.py and the judges sample in batches)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``/fp32 -> None (no autocast); bf16/fp16 (names or torch dtypes) -> the torch dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is None or dtype == torch.float32:
        return None
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32 (or one of {sorted(DTYPES)}), "
                          f"got {reprlib.repr(dtype)}")
    return dtype


def _interval(value):
    """A list or tuple as a tuple (SamplingDefaults' type); anything else as given, for its check to name."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _texts(name: str, value: object) -> list[str]:
    """One string, or a sequence of strings, as a list; anything else is a ConfigError naming ``name``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, bytes) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{name} must be a string or a list of strings, got {reprlib.repr(value)} "
                      f"({type(value).__name__})")


@dataclass(frozen=True)
class CallSettings:
    """A call's arguments, checked, with the checkpoint's defaults filled in: what a call samples with (and what
    ``sample.py`` records beside each image)."""

    prompts: list[str]  # one per image: each prompt num_images_per_prompt times
    negatives: list[str]  # one per image
    sampling: SamplingDefaults  # the checkpoint's defaults with the call's overrides
    height: int
    width: int
    eta: float
    strength: float
    autoguidance_scale: float
    output_type: str
    autocast_dtype: torch.dtype | None  # None: fp32, no autocast
    vae_tile_size: int | None
    vae_tile_overlap: int


def default_tile_overlap(tile_size: int) -> int:
    """The latent pixels tiles overlap by when a call names none: a quarter of the tile, at most 8."""
    return min(8, tile_size // 4)


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
            values = dict(sampling or {})
            if values.get("sampler") is None:  # a flow model's default differs from a diffusion model's
                values["sampler"] = default_sampler(self.schedule, prediction_type)
            sampling = SamplingDefaults.from_dict(values)
        self.sampling = sampling
        self.downsample_factor = vae.downsample_factor if vae is not None else 1
        self._warned_guidance = False

    @property
    def parts(self) -> list[nn.Module]:
        """The modules the pipeline runs (those it holds)."""
        return [p for p in (self.unet, self.text_encoder, self.vae, self.guide_unet, self.guide_text_encoder)
                if p is not None]

    @property
    def share_guided_input(self) -> bool:
        """Whether a guided step gives the UNet the latents once with both contexts (``contexts_per_input=2``), so
        the layers before its first cross-attention run once for [uncond; cond]: ldm's UNet takes that argument.
        The outputs equal those of the repeated batch to rounding."""
        return isinstance(self.unet, UNet)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the sampler steps: the VAE's, or the UNet's output (a pixel model)."""
        if self.vae is not None:
            return self.vae.embed_dim
        return getattr(self.unet, "out_channels", None) or self.unet.in_channels

    @property
    def is_inpainting(self) -> bool:
        """Whether the UNet takes a mask and masked-image latents after the noisy latents (SD-inpainting's 9
        input channels: latents, mask, masked-image latents)."""
        return getattr(self.unet, "in_channels", self.latent_channels) == 2 * self.latent_channels + 1

    @property
    def num_classes(self) -> int | None:
        """The classes of a class-conditional UNet (each call then takes ``class_labels``), None for another."""
        return getattr(self.unet, "num_classes", None)

    @property
    def size_multiple(self) -> int:
        """What height and width must be multiples of: the first stage's downsampling (8 for SD's VAE). The UNet takes
        any latent size (an odd size halved rounds up, and its upsampling meets the skip connection's size)."""
        return self.downsample_factor

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

    def compile_unet(self, mode: str | None = None) -> LatentDiffusionPipeline:
        """torch.compile the UNet in place (kernels cached under ``$LDM_CACHE/inductor``, see
        :func:`ldm.compiling.compile_in_place`); returns the pipeline. The first call compiles (a minute or two on a
        CPU for a small UNet, much less from the cache), so it pays for many images, not for a few. A compiled UNet
        recomputes the context's keys and values at every step (``reuse_context_projections`` stays out of compiled
        graphs). ``mode`` is
        torch.compile's: ``reduce-overhead`` replays each step as a CUDA graph on a GPU."""
        compile_in_place(self.unet, mode=mode)
        return self

    def load_lora(self, path: str | Path, scale: float = 1.0) -> LatentDiffusionPipeline:
        """Add a LoRA's adapters to the UNet (and the text encoder, where the file has some), scaled by ``scale``:
        a ``.safetensors`` file in the diffusers or kohya format, or a LoRA run's ldm checkpoint (its adapters;
        this pipeline is the base). Returns the pipeline."""
        from ldm.checkpoint import read_lora_checkpoint
        from ldm.lora import load_lora, load_lora_state_dict, lora_file_parts

        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if Path(path).suffix == ".safetensors":
            found = lora_file_parts(path)
            adapters = None
        else:
            adapters = read_lora_checkpoint(path)
            found = set(adapters)
        if "text_encoder" in found and self.text_encoder is None:
            raise ConfigError(f"{path} has text-encoder adapters but this model has no text encoder")
        if "unet" not in found and "text_encoder" not in found:
            raise ConfigError(f"{path} has no adapters for the UNet or the text encoder")
        for name in sorted(found):
            if adapters is None:
                load_lora(parts[name], path, scale=scale)
            else:
                state, alphas = adapters[name]
                load_lora_state_dict(parts[name], state, alphas, scale=scale)
        return self

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

    def check_call(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        sampler: str | None = None,
        eta: float = 0.0,
        strength: float = 0.8,
        guidance_rescale: float | None = None,
        guidance_interval: Sequence[float] | None = None,
        autoguidance_scale: float | None = None,
        output_type: str = "pil",
        dtype: torch.dtype | str | None = None,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int | None = None,
    ) -> CallSettings:
        """Check a call's plain arguments (those of :meth:`__call__` but the tensors, generators and callback) and
        fill in the checkpoint's defaults, without sampling. A wrong value (zero steps or pixels, NaN or inf, a bool
        or a string for a number, an unknown name) is a ConfigError naming the argument; None takes the default."""
        prompts = _texts("prompt", prompt)
        if not prompts:
            raise ConfigError("prompt is an empty list: give at least one prompt")
        per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, "be an integer >= 1", lambda v: v >= 1)
        if len(prompts) * per_prompt > MAX_BATCH:
            raise ConfigError(f"{len(prompts)} prompts x num_images_per_prompt={per_prompt} is more than {MAX_BATCH} "
                              "images in one call: sample in batches")
        s = self.settings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                          guidance_rescale=guidance_rescale, guidance_interval=_interval(guidance_interval))
        check_sampler(s.sampler, self.schedule, self.prediction_type)
        T = self.schedule.get("num_train_timesteps", 1000)
        if s.num_inference_steps > T:
            raise ConfigError(f"num_inference_steps must lie in [1, {T}] (the training timesteps), got "
                              f"{s.num_inference_steps}")
        size = s.image_size or 32
        height = size if height is None else height
        width = size if width is None else width
        f = self.size_multiple
        for side in (height, width):
            if isinstance(side, bool) or not isinstance(side, numbers.Integral) or not 1 <= side <= MAX_SIDE or \
                    side % f:
                raise ConfigError(f"height and width must be positive multiples of the model's downsampling factor "
                                  f"{f} (at most {MAX_SIDE}), got {reprlib.repr(height)}x{reprlib.repr(width)}")
        height, width = int(height), int(width)
        try:  # a step count the sampler cannot space (DPM-Solver's and UniPC's linspace at n = T repeats timesteps)
            set_steps(make_scheduler(s.sampler, self.schedule, self.prediction_type), s.num_inference_steps,
                      (1, 1, height // f, width // f))
        except ValueError as err:
            raise ConfigError(f"num_inference_steps={s.num_inference_steps} with sampler={s.sampler}: {err}") from None
        eta = check_real("eta", eta, "be a finite number >= 0 (DDIM's noise: 0 = deterministic)", lambda v: v >= 0)
        if eta != 0 and s.sampler != "ddim":
            warnings.warn(f"eta={eta} is DDIM's noise: sampler={s.sampler} ignores it", stacklevel=3)
        strength = check_real("strength", strength, "lie in (0, 1]", lambda v: 0 < v <= 1)
        auto = self.resolve_autoguidance(autoguidance_scale)
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type must be one of {OUTPUT_TYPES}, got {reprlib.repr(output_type)}")
        autocast_dtype = resolve_dtype(dtype)
        overlap = 0
        if vae_tile_size is not None:
            vae_tile_size = check_int("vae_tile_size", vae_tile_size, "be a positive number of latent pixels (or None)",
                                      lambda v: v >= 1)
            overlap = default_tile_overlap(vae_tile_size) if vae_tile_overlap is None else check_int(
                "vae_tile_overlap", vae_tile_overlap, f"lie in [0, vae_tile_size={vae_tile_size})",
                lambda v: 0 <= v < vae_tile_size)
        elif vae_tile_overlap is not None:
            raise ConfigError(f"vae_tile_overlap={reprlib.repr(vae_tile_overlap)} needs vae_tile_size (the tiles it "
                              "overlaps); give both, or neither")
        images = [p for p in prompts for _ in range(per_prompt)]
        if negative_prompt is None:
            negatives = [""] * len(images)
        else:
            given = _texts("negative_prompt", negative_prompt)
            if isinstance(negative_prompt, str):
                given = given * len(prompts)
            if len(given) != len(prompts):
                raise ConfigError(f"got {len(given)} negative prompts for {len(prompts)} prompts; give one, or one "
                                  "per prompt")
            negatives = [p for p in given for _ in range(per_prompt)]
        return CallSettings(images, negatives, s, height, width, eta, strength, auto, output_type, autocast_dtype,
                            vae_tile_size, overlap)

    def _check_tensors(self, c: CallSettings, generator: Generators, image, latents,
                       callback) -> list[torch.Generator] | torch.Generator | None:
        """Check the tensor-valued arguments against the call's batch and size; the generators as given or a list."""
        n = len(c.prompts)
        if generator is not None and not isinstance(generator, torch.Generator):
            try:
                generator = list(generator)
            except TypeError:
                generator = None
            if generator is None or not all(isinstance(g, torch.Generator) for g in generator):
                raise ConfigError("generator must be a torch.Generator or a list of them (one per image)")
            if len(generator) != n:
                raise ConfigError(f"got {len(generator)} generators for {n} images: give one, or one per image")
        channels = self.latent_channels if self.vae is None else self.vae.config["in_channels"]
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image[None]
            if image.ndim not in (3, 4) or x.shape[0] not in (1, n) or tuple(x.shape[1:]) != (channels, c.height,
                                                                                                c.width):
                raise ConfigError(f"image tensor must have shape [{channels}, {c.height}, {c.width}] or [1 or {n}, "
                                  f"{channels}, {c.height}, {c.width}] (values in [-1, 1]), got {tuple(image.shape)}")
            if not image.is_floating_point() or not torch.isfinite(image).all():
                raise ConfigError("image tensor must hold finite floating-point values in [-1, 1]")
        elif image is not None and (not isinstance(image, Image.Image) or 0 in image.size):
            raise ConfigError(f"image must be a non-empty PIL image or a tensor, got {reprlib.repr(image)}")
        if latents is not None:
            f = self.downsample_factor
            shape = (n, self.latent_channels, c.height // f, c.width // f)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else reprlib.repr(latents)
                raise ConfigError(f"latents must have shape {shape}, got {got}")
            if not latents.is_floating_point() or not torch.isfinite(latents).all():
                raise ConfigError("latents must hold finite floating-point values (no NaN or inf)")
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback must be callable(i, t, latents, x0) or None, got {reprlib.repr(callback)}")
        return generator

    def _check_embeds(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> list[str]:
        """Check precomputed text embeddings against the UNet and each other; the placeholder prompts ("", one per
        embedding) that count the call's images."""
        if prompt_embeds is None:
            raise ConfigError("negative_prompt_embeds needs prompt_embeds: give both, or prompt and negative_prompt")
        if prompt is not None:
            raise ConfigError("give prompt or prompt_embeds, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ConfigError("give negative_prompt or negative_prompt_embeds, not both")
        width = getattr(self.unet, "context_dim", None)
        if width is None:
            raise ConfigError("prompt_embeds were given but this UNet takes no text context (context_dim=None)")
        for name, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if e is None:
                continue
            if not isinstance(e, torch.Tensor) or e.ndim != 3 or e.shape[0] < 1 or e.shape[1] < 1 or \
                    e.shape[2] != width:
                got = tuple(e.shape) if isinstance(e, torch.Tensor) else reprlib.repr(e)
                raise ConfigError(f"{name} must be a tensor [prompts, tokens, {width}] (the UNet's context width), "
                                  f"got {got}")
            if not e.is_floating_point() or not torch.isfinite(e).all():
                raise ConfigError(f"{name} must hold finite floating-point values")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ConfigError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have prompt_embeds' "
                              f"shape {tuple(prompt_embeds.shape)} (guidance batches them together)")
        return [""] * prompt_embeds.shape[0]

    def class_label_tensor(self, class_labels: torch.Tensor | Sequence[int] | None, n: int) -> torch.Tensor | None:
        """``class_labels`` (a tensor or a sequence of ints) checked against this UNet's classes as an int64 tensor
        of ``n`` labels; None for a UNet without classes. A wrong count, type or value is a ConfigError."""
        num_classes = self.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ConfigError("class_labels were given but this UNet is not class-conditional")
            return None
        if isinstance(class_labels, Sequence) and not isinstance(class_labels, str) and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in class_labels):
            class_labels = torch.tensor([int(v) for v in class_labels], dtype=torch.int64)
        if not isinstance(class_labels, torch.Tensor) or tuple(class_labels.shape) != (n,) or \
                class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool or \
                not bool(((class_labels >= 0) & (class_labels < num_classes)).all()):
            raise ConfigError(f"this UNet is class-conditional: class_labels must be {n} integers (a tensor of shape "
                              f"[{n}] or a list) in [0, {num_classes}), got {reprlib.repr(class_labels)}")
        return class_labels.long()

    def _image_tensor(self, image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image[None]
        else:
            channels = self.latent_channels if self.vae is None else self.vae.config["in_channels"]
            mode = "L" if channels == 1 else "RGB"
            if image.mode != mode:
                warnings.warn(f"init image has mode {image.mode}; converted to {mode}", stacklevel=3)
                image = eight_bit(image).convert(mode)  # 16-bit grey scaled, as training reads it (not clipped)
            if image.size != (width, height):
                warnings.warn(f"init image is {image.size[0]}x{image.size[1]}; resized to {width}x{height}",
                              stacklevel=3)
                image = image.resize((width, height), Image.BICUBIC)
            arr = np.asarray(image, dtype=np.float32) / 127.5 - 1
            x = torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1)[None]
        return x.to(self.device, torch.float32)  # a float64 or half tensor would meet float32 weights

    def _check_mask(self, c: CallSettings, image, mask_image, legacy_inpaint: bool) -> None:
        """Check ``mask_image`` against the image, the model and the call's size and batch (a ConfigError)."""
        if not isinstance(legacy_inpaint, bool):
            raise ConfigError(f"legacy_inpaint must be true or false, got {reprlib.repr(legacy_inpaint)}")
        if mask_image is None:
            if legacy_inpaint:
                raise ConfigError("legacy_inpaint=True blends the unmasked region back: give image= and mask_image=")
            if image is not None and self.is_inpainting:
                raise ConfigError("this is an inpainting model (its UNet takes a mask): give mask_image= with image= "
                                  "(white = repaint; an all-white mask repaints everything)")
            return
        if image is None:
            raise ConfigError("mask_image needs image=, the picture whose white-masked region is repainted")
        if self.is_inpainting and legacy_inpaint:
            raise ConfigError("legacy_inpaint=True is for a model without mask inputs; this inpainting model's UNet "
                              "takes the mask itself: drop legacy_inpaint")
        if not self.is_inpainting and not legacy_inpaint:
            raise ConfigError(
                f"mask_image needs an inpainting model (a UNet with {2 * self.latent_channels + 1} input channels: "
                f"latents, mask, masked-image latents); this UNet takes {getattr(self.unet, 'in_channels', '?')}. "
                "Pass legacy_inpaint=True to blend the unmasked region back at each step instead (weaker at the "
                "mask's edges), or load an SD-inpainting checkpoint")
        n = len(c.prompts)
        image_size = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
        if isinstance(mask_image, Image.Image):
            if 0 in mask_image.size:
                raise ConfigError("mask_image is an empty PIL image")
            size = mask_image.size
        elif isinstance(mask_image, torch.Tensor):
            m = mask_image
            if m.ndim not in (2, 3, 4) or (m.ndim == 4 and m.shape[1] != 1) or \
                    (m.ndim >= 3 and m.shape[0] not in (1, n)):
                raise ConfigError(f"mask_image tensor must have shape [H, W], [1 or {n}, H, W] or [1 or {n}, 1, H, "
                                  f"W] (values in [0, 1], 1 = repaint), got {tuple(m.shape)}")
            if m.dtype != torch.bool and (not m.is_floating_point() or not torch.isfinite(m).all()):
                raise ConfigError("mask_image tensor must hold finite floating-point (or bool) values in [0, 1]")
            size = (m.shape[-1], m.shape[-2])
        else:
            raise ConfigError(f"mask_image must be a PIL image or a tensor, got {reprlib.repr(mask_image)}")
        if tuple(size) != tuple(image_size):
            raise ConfigError(f"mask_image is {size[0]}x{size[1]} but image is {image_size[0]}x{image_size[1]} "
                              "(width x height): give a mask of the image's size")

    def _mask_tensor(self, mask_image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The mask as [1 or B, 1, height, width] in {0, 1} on the device: grey-scale, resized as the image is,
        binarized at 0.5 (diffusers' ``VaeImageProcessor(do_binarize=True)``)."""
        if isinstance(mask_image, torch.Tensor):
            m = mask_image.float()
            m = m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 else m
            if tuple(m.shape[-2:]) != (height, width):  # the image's size: a PIL image is resized to the call's
                m = F.interpolate(m, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        else:
            image = eight_bit(mask_image).convert("L")  # a 16-bit mask scaled, as training reads it
            if image.size != (width, height):
                image = image.resize((width, height), Image.LANCZOS)
            m = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
        return binarize(m).to(self.device)

    def _inpaint_start(self, c: CallSettings, scheduler, image, mask_image, noise: torch.Tensor):
        """The starting latents, the UNet's extra inputs (mask and masked-image latents, or None) and the legacy
        blend (or None) of an inpainting call, as diffusers' ``StableDiffusionInpaintPipeline``: strength 1 starts
        from noise, a lower one from the image noised as image-to-image. Without an image (an inpainting model
        asked for text-to-image) everything is repainted, as training's full masks."""
        n, (h, w) = noise.shape[0], noise.shape[-2:]
        strength = 1.0 if image is None else c.strength  # nothing to start from: pure noise, every step
        if image is None:
            channels = self.latent_channels if self.vae is None else self.vae.config["in_channels"]
            pixels = torch.zeros(1, channels, c.height, c.width, device=self.device)
            mask = torch.ones(1, 1, c.height, c.width, device=self.device)
        else:
            pixels = self._image_tensor(image, c.height, c.width)
            mask = self._mask_tensor(mask_image, c.height, c.width)

        def encode(x: torch.Tensor) -> torch.Tensor:
            z = self.encode_image(x)
            return z.expand(n, -1, -1, -1) if z.shape[0] == 1 else z

        steps = c.sampling.num_inference_steps
        if strength < 1:
            start_at(scheduler, steps, strength_steps(steps, strength, scheduler))
        legacy = not self.is_inpainting
        z0 = encode(pixels) if strength < 1 or legacy else None
        x = noise_to_start(scheduler, z0, noise) if strength < 1 else noise * scheduler.init_noise_sigma
        m = latent_mask(mask, (h, w)).expand(n, -1, -1, -1)
        if not legacy:
            return x, torch.cat([m, encode(masked_image(pixels, mask))], dim=1), None
        timesteps = scheduler.timesteps

        def blend(i: int, latents: torch.Tensor) -> torch.Tensor:
            """Keep the unmasked region on the image's own noisy path: noised to the next timestep, clean at the end."""
            last = i >= len(timesteps) - 1
            known = z0 if last else forward_noise(scheduler, z0, noise, timesteps[i + 1:i + 2], step_index=i + 1)
            return (1 - m) * known + m * latents

        return x, None, blend

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
        auto = check_real("autoguidance_scale", requested, "be a finite number >= 1 (1 disables it)",
                          lambda v: v >= 1)
        if auto != 1.0 and self.guide_unet is None:
            raise ConfigError(f"autoguidance_scale={auto} needs a guide snapshot, and this checkpoint holds none "
                              "(train with ldm_stage.guide_snapshot_step=N); use autoguidance_scale=1")
        return auto

    def settings(self, **overrides) -> SamplingDefaults:
        """The checkpoint's sampling defaults with a call's overrides (None keeps the default), checked: a wrong value
        or an unknown name is a ConfigError."""
        return self.sampling.with_overrides(**overrides)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
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
        class_labels: torch.Tensor | Sequence[int] | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        output_type: str = "pil",
        dtype: torch.dtype | str | None = None,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int | None = None,
        mask_image: Image.Image | torch.Tensor | None = None,
        legacy_inpaint: bool = False,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images. Every ``None`` takes the checkpoint's sampling default (:class:`SamplingDefaults`).

        Args:
            prompt: one prompt or a list; each gives ``num_images_per_prompt`` images.
            negative_prompt: the prompt guidance moves away from ("" when None): one, or one per prompt.
            num_inference_steps: sampler steps, in [1, num_train_timesteps].
            guidance_scale: classifier-free guidance scale (1 or less: none, the conditional model alone, as in
                diffusers). Ignored, with a warning, by a model without a text encoder.
            height, width: in pixels, multiples of :attr:`size_multiple` (the first stage's downsampling), at
                most ``MAX_SIDE``.
            generator: one ``torch.Generator`` for the batch, or one per image (image i's noise then comes from
                generator i alone, so it can be regenerated alone).
            sampler: a name in ``ldm.diffusion.sampling.SAMPLERS`` (``dpm_solver++``, ``ddim``, ``euler``, ``unipc``...;
                ``flow_euler`` for a flow-matching model); ``eta`` is DDIM's noise (0 = deterministic).
            image, strength: image-to-image: start from ``image`` noised to the fraction ``strength`` of the steps.
            guidance_rescale: blend of the std-rescaled guided output (Lin et al., 2023), in [0, 1].
            guidance_interval: ``(lo, hi)``: guide only the steps with lo <= t <= hi (training timesteps).
            autoguidance_scale: > 1 also guides away from the checkpoint's guide snapshot (one more UNet pass per
                step); a default the file cannot honour falls back to 1 with a warning.
            latents: the initial noise, of shape [B, C, H / f, W / f], instead of drawing it (with ``image``, the
                noise the image is noised with). Any float dtype; sampling runs in float32.
            class_labels: a class-conditional UNet's class of each image (B integers: a tensor or a list; B is the
                number of prompts times ``num_images_per_prompt``); the unconditional pass of guidance takes the same
                classes (classifier-free guidance on the text).
            callback: ``callback(i, t, latents, x0_prediction)`` after each step.
            output_type: ``pil`` (a list of images), ``tensor`` ([B, C, H, W] in [-1, 1]) or ``latent``.
            dtype: bf16/fp16 runs the text encoder and the UNet under ``torch.autocast`` (the sampler arithmetic
                stays fp32); the VAE decodes outside autocast. None is fp32, even inside an enclosing autocast: the
                call's precision is this argument's.
            vae_tile_size, vae_tile_overlap: decode overlapping tiles of this many latent pixels, blended over the
                overlap (default min(8, tile // 4)), bounding the decoder's memory.
            mask_image: inpainting: repaint the white (>= 0.5) region of ``image`` (a PIL image, or a tensor in
                [0, 1] of shape [H, W], [B, H, W] or [B, 1, H, W], of the image's size), keep the rest. An inpainting
                UNet (SD-inpainting's 9 input channels) gets the mask and the masked-image latents at every step;
                ``strength`` < 1 starts from the noised image. An inpainting model called without an image repaints
                everything (text-to-image, from pure noise whatever ``strength`` is).
            legacy_inpaint: with a model without mask inputs, replace the unmasked region by the noised image
                after each step (diffusers' fallback for 4-channel UNets); weaker at the mask's edges.
            prompt_embeds: the text encoder's output [P, L, D] instead of ``prompt`` (weighted or long prompts,
                embeddings computed elsewhere): P prompts, any length L, the UNet's context width D.
            negative_prompt_embeds: guidance's unconditional context, of ``prompt_embeds``' shape, instead of
                encoding ``negative_prompt`` (or ""); needed for guidance on a pipeline without a text encoder.
        """
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            prompt = self._check_embeds(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        elif prompt is None:
            raise ConfigError("give prompt (a string or a list of strings), or prompt_embeds")
        c = self.check_call(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                            num_images_per_prompt, sampler, eta, strength, guidance_rescale, guidance_interval,
                            autoguidance_scale, output_type, dtype, vae_tile_size, vae_tile_overlap)
        generator = self._check_tensors(c, generator, image, latents, callback)
        labels = self.class_label_tensor(class_labels, len(c.prompts))
        self._check_mask(c, image, mask_image, legacy_inpaint)
        s, height, width, auto, autocast_dtype = c.sampling, c.height, c.width, c.autoguidance_scale, c.autocast_dtype
        prompts, negatives, n = c.prompts, c.negatives, len(c.prompts)
        if prompt_embeds is not None and auto != 1.0 and self.guide_text_encoder is not None:
            raise ConfigError("autoguidance here encodes the prompts' text with the snapshot's own text encoder: give "
                              "prompt rather than prompt_embeds, or autoguidance_scale=1")
        scale = s.guidance_scale
        if self.text_encoder is None and negative_prompt_embeds is None and scale > 1.0:
            if not self._warned_guidance:
                warnings.warn(f"this model has no text encoder (unconditional or pixel-space): guidance_scale={scale} "
                              "is ignored, sampling with guidance 1", stacklevel=2)
                self._warned_guidance = True
            scale = 1.0
        device = self.device
        unet_dtype = next(self.unet.parameters()).dtype
        autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                  enabled=autocast_dtype is not None)
        with self._eval_mode():
            with autocast:
                if prompt_embeds is None:
                    context = self._encode_prompts(prompts)
                else:  # each prompt's embedding num_images_per_prompt times, in the UNet's dtype (as diffusers)
                    per_prompt = n // prompt_embeds.shape[0]
                    context = prompt_embeds.to(device, unet_dtype).repeat_interleave(per_prompt, dim=0)
                uncond = None
                if scale > 1.0:  # <= 1: no guidance
                    uncond = self._encode_prompts(negatives) if negative_prompt_embeds is None else \
                        negative_prompt_embeds.to(device, unet_dtype).repeat_interleave(
                            n // len(negative_prompt_embeds), dim=0)
                    if prompt_embeds is not None and tuple(uncond.shape) != tuple(context.shape):
                        raise ConfigError(f"the negative prompt's embeddings have shape {tuple(uncond.shape[1:])}, "
                                          f"prompt_embeds {tuple(prompt_embeds.shape[1:])}: guidance batches them "
                                          "together, so give negative_prompt_embeds of prompt_embeds' shape")
                guide_context = None
                if auto != 1.0 and self.guide_text_encoder is not None:
                    guide_context = self.guide_text_encoder.encode(prompts).hidden
            guidance = ClassifierFreeGuidance(scale, uncond, s.guidance_rescale, s.guidance_interval,
                                              share_input=self.share_guided_input)
            if auto != 1.0:
                guidance = AutoGuidance(self.guide_unet, auto, guide_context, cfg=guidance)

            f = self.downsample_factor
            shape = (n, self.latent_channels, height // f, width // f)
            scheduler = make_scheduler(s.sampler, self.schedule, self.prediction_type, latent_shape=shape)
            set_steps(scheduler, s.num_inference_steps, shape)
            concat = blend = None
            # the initial noise: for image-to-image and inpainting, what the image is noised with
            noise = latents.to(device, torch.float32) if latents is not None else randn(shape, generator, device)
            if self.is_inpainting or mask_image is not None:
                x, concat, blend = self._inpaint_start(c, scheduler, image, mask_image, noise)
            elif image is not None:
                x = self._image_tensor(image, height, width)
                z0 = self.encode_image(x)
                z0 = z0.expand(n, -1, -1, -1) if z0.shape[0] == 1 else z0
                steps = s.num_inference_steps
                start_at(scheduler, steps, strength_steps(steps, c.strength, scheduler))
                x = noise_to_start(scheduler, z0, noise)
            else:
                x = noise * scheduler.init_noise_sigma  # the sigma samplers start at their largest level

            with autocast, reuse_context_projections(self.unet):  # the context is one tensor for every step
                z = sample_loop(self.unet, scheduler, x, context, guidance, eta=c.eta, generator=generator,
                                callback=callback, post_step=blend, concat=concat,
                                y=None if labels is None else labels.to(device))
            self._check_finite(z, c, "latents")
            if c.output_type == "latent":
                return z
            images = self.decode_latents(z, c.vae_tile_size, c.vae_tile_overlap)
            if self.vae is not None:
                self._check_finite(images, c, "decoded images")
        return images.float() if c.output_type == "tensor" else to_pil(images)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> the normalised latents of the posterior's mode (float32), as image-to-image
        and inpainting start from them: encoded in the VAE's dtype and without autocast, as ``decode_latents`` decodes
        (an enclosing ``torch.autocast`` would change the result; a bfloat16 VAE would refuse a float32 image)."""
        if self.vae is None:
            return x
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.vae.encode(x.to(next(self.vae.parameters()).dtype)).mode()
        return self.vae.normalize_latents(z.float())

    def decode_latents(self, z: torch.Tensor, vae_tile_size: int | None = None,
                       vae_tile_overlap: int | None = None) -> torch.Tensor:
        """Latents to images in [-1, 1] as a call decodes them (in the VAE's dtype; in tiles of ``vae_tile_size``
        latent pixels overlapping by ``vae_tile_overlap``, default ``default_tile_overlap``): for previews of the
        intermediate latents (``sample.py``'s GIFs) that end on the image the call returns."""
        if self.vae is None:
            return z.clamp(-1, 1)
        if vae_tile_size is not None and vae_tile_overlap is None:
            vae_tile_overlap = default_tile_overlap(vae_tile_size)
        return self.vae.decode_latents(z.to(next(self.vae.parameters()).dtype), tile_size=vae_tile_size,
                                       tile_overlap=0 if vae_tile_overlap is None else vae_tile_overlap)

    @staticmethod
    def _check_finite(x: torch.Tensor, c: CallSettings, what: str) -> None:
        """NaN or inf in a result is an error, never an image (it would save as black)."""
        if not torch.isfinite(x).all():
            raise ConfigError(
                f"sampling produced NaN or inf {what} (guidance_scale={c.sampling.guidance_scale}, "
                f"sampler={c.sampling.sampler}, dtype={c.autocast_dtype or torch.float32}): the settings overflow "
                "(lower guidance_scale; sample in fp32 or bf16 rather than fp16) or the checkpoint's weights are not "
                "finite")


__all__ = ["MAX_BATCH", "MAX_SIDE", "SAMPLERS", "CallSettings", "LatentDiffusionPipeline", "resolve_dtype"]
