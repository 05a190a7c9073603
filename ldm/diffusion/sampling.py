"""Sampling: the named schedulers, the sampling defaults a model carries, and the loop that runs a scheduler over
a denoiser. The loop knows nothing of text or VAEs: it gets contexts and a guidance object and returns latents."""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.diffusion.guidance import ClassifierFreeGuidance, Denoiser, check_guidance_interval
from ldm.diffusion.schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from ldm.diffusion.schedulers.base import DiscreteScheduler
from ldm.errors import ConfigError

SAMPLERS: dict[str, type[DiscreteScheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm_solver++": DPMSolverMultistepScheduler,
}
Generators = torch.Generator | Sequence[torch.Generator] | None


def _got(value: Any, kind: type = numbers.Real) -> str:
    """``value`` for an error message: its repr (shortened), and its type when it is not of ``kind``."""
    shown = reprlib.repr(value)
    return shown if isinstance(value, kind) and not isinstance(value, bool) else f"{shown} ({type(value).__name__})"


def check_real(name: str, value: Any, must: str, ok: Callable[[float], bool] = lambda v: True) -> float:
    """``value`` as a float if it is a finite real number (not a bool, not a string) for which ``ok`` holds; else a
    ConfigError "``name`` must ``must``, got ...". NaN and inf are never accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
            not ok(float(value)):
        raise ConfigError(f"{name} must {must}, got {_got(value)}")
    return float(value)


def check_int(name: str, value: Any, must: str, ok: Callable[[int], bool] = lambda v: True) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float such as 3.0) for which ``ok`` holds; else a
    ConfigError "``name`` must ``must``, got ..."."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(int(value)):
        raise ConfigError(f"{name} must {must}, got {_got(value, numbers.Integral)}")
    return int(value)


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model samples when a call does not say: saved in every checkpoint, read by the pipeline, ``sample.py``,
    the training sample grids and the judges. The one place these defaults are written.

    ``image_size`` None means the model's training resolution (for Stable Diffusion files, 512 or 768).
    """

    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    sampler: str = "dpm_solver++"
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None  # guide only lo <= t <= hi (training timesteps)
    autoguidance_scale: float = 1.0  # > 1 needs a guide snapshot in the checkpoint
    image_size: int | None = None

    def __post_init__(self) -> None:
        """Check every field (a ConfigError naming it) and normalize numbers to plain int/float (JSON-safe)."""
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("guidance_scale", check_real("guidance_scale", self.guidance_scale,
                                         "be a finite number >= 0 (1 = no guidance)", lambda v: v >= 0))
        put("num_inference_steps", check_int("num_inference_steps", self.num_inference_steps, "be an integer >= 1",
                                             lambda v: v >= 1))
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {reprlib.repr(self.sampler)}; expected one of {sorted(SAMPLERS)}")
        put("guidance_rescale", check_real("guidance_rescale", self.guidance_rescale, "lie in [0, 1]",
                                           lambda v: 0 <= v <= 1))
        if self.guidance_interval is not None:
            put("guidance_interval", check_guidance_interval(self.guidance_interval))
        put("autoguidance_scale", check_real("autoguidance_scale", self.autoguidance_scale,
                                             "be a finite number >= 1 (1 disables it)", lambda v: v >= 1))
        if self.image_size is not None:
            put("image_size", check_int("image_size", self.image_size, "be a positive integer or null",
                                        lambda v: v >= 1))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> SamplingDefaults:
        """From a config or a checkpoint's dict; a None value takes the default. ``latent_shape``, which older
        checkpoints stored, is derived now and ignored; any other unknown key is an error naming the known ones."""
        values = {k: v for k, v in dict(values or {}).items() if k != "latent_shape" and v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown sampling settings {unknown}; known: {sorted(known)}")
        if isinstance(values.get("guidance_interval"), list):
            values["guidance_interval"] = tuple(values["guidance_interval"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["guidance_interval"] is not None:
            d["guidance_interval"] = list(d["guidance_interval"])
        return d

    def with_overrides(self, **overrides: Any) -> SamplingDefaults:
        """A copy with the overrides that are not None, checked; an unknown name is a ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown sampling settings {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def make_scheduler(name: str, schedule: Mapping[str, Any], prediction_type: str) -> DiscreteScheduler:
    """Build the named sampler for a model trained with ``schedule`` (NoiseSchedule.from_name keywords).

    Spacing is ``trailing`` for DDPM/DDIM (it starts at the last training step, which zero-terminal-SNR models need)
    and DPM-Solver's own ``linspace``; x0 clipping is off (latents are not bounded to [-1, 1]).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    kw = dict(
        num_train_timesteps=schedule.get("num_train_timesteps", 1000),
        beta_start=schedule.get("beta_start", 0.0001),
        beta_end=schedule.get("beta_end", 0.02),
        beta_schedule=schedule.get("schedule", "linear"),
        rescale_betas_zero_snr=schedule.get("rescale_betas_zero_snr", False),
        prediction_type=prediction_type,
    )
    if name == "dpm_solver++":
        return DPMSolverMultistepScheduler(**kw)
    return SAMPLERS[name](clip_sample=False, timestep_spacing="trailing", **kw)


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise on ``device``; with a list of generators, row i is one draw of generator i alone
    (what a batch of one would draw), so any image of a batch can be regenerated alone."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: give one per image")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
                      for g in generator])


def _step(scheduler: DiscreteScheduler, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor, eta: float,
          generator: Generators):
    kw: dict[str, Any] = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if generator is None or isinstance(generator, torch.Generator):
        return scheduler.step(out, t, x.float(), generator=generator, **kw)
    # one generator per image: draw each image's step noise from its own generator, exactly when the sampler would
    if (isinstance(scheduler, DDPMScheduler) and int(t) > 0) or (isinstance(scheduler, DDIMScheduler) and eta > 0):
        kw["variance_noise"] = randn(tuple(out.shape), generator, out.device, out.dtype)
    return scheduler.step(out, t, x.float(), **kw)


@torch.no_grad()
def sample_loop(
    denoise: Denoiser,
    scheduler: DiscreteScheduler,
    latents: torch.Tensor,
    context: torch.Tensor | None,
    guidance: Callable[..., torch.Tensor] | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    **denoise_kwargs: torch.Tensor | None,
) -> torch.Tensor:
    """Denoise ``latents`` through ``scheduler.timesteps`` (already set, possibly truncated for image-to-image).

    ``guidance(denoise, x, t, context, **kwargs)`` gives the output the scheduler steps with
    (:class:`~ldm.diffusion.guidance.ClassifierFreeGuidance`, :class:`~ldm.diffusion.guidance.AutoGuidance`); None
    runs the conditional model alone. ``generator`` may be a list with one generator per image: the stochastic
    samplers' noise for image i then comes from generator i alone. ``callback(i, t, latents, x0_prediction)`` runs
    after each step. ``denoise_kwargs`` (e.g. class labels ``y``) go to every network call; None values are dropped.
    """
    if scheduler.timesteps is None:
        raise ValueError("call scheduler.set_timesteps(n) before sample_loop")
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != latents.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {latents.shape[0]}: give one per image")
    guidance = guidance or ClassifierFreeGuidance()
    kwargs = {k: v for k, v in denoise_kwargs.items() if v is not None}
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        result = _step(scheduler, guidance(denoise, x, tt, context, **kwargs), t, x, eta, generator)
        x = result.prev_sample
        if callback is not None:
            callback(i, int(t), x, result.pred_original_sample)
    return x
