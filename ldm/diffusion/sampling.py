"""Sampling: the named samplers, the sampling defaults a model carries, and the loop that runs a sampler over a
denoiser. The loop knows nothing of text or VAEs: it gets contexts and a guidance object and returns latents.

Diffusion models (a noise schedule, epsilon / v / x0 prediction) take the DDPM/DDIM/DPM-Solver/Euler/Heun/UniPC
samplers; flow-matching models (``prediction_type="flow"``) take ``flow_euler``. A name of the other family is
refused, saying why."""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.diffusion.flow import FLOW_PREDICTION
from ldm.diffusion.guidance import ClassifierFreeGuidance, Denoiser, check_guidance_interval
from ldm.diffusion.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from ldm.diffusion.schedulers.base import DiscreteScheduler
from ldm.diffusion.schedulers.dpm_solver import SigmaSteps
from ldm.diffusion.schedulers.flow_match import resolution_mu
from ldm.diffusion.schedulers.sigmas import SigmaScheduler
from ldm.errors import ConfigError

SAMPLERS: dict[str, type] = {  # name -> scheduler class; make_scheduler sets each one's options
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm_solver++": DPMSolverMultistepScheduler,  # 2M, on the schedule's own levels
    "dpm++_2m_karras": DPMSolverMultistepScheduler,  # 2M on Karras levels
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,  # two network calls a step but the last
    "unipc": UniPCMultistepScheduler,  # UniPC-bh2, order 2, x0 prediction
    "flow_euler": FlowMatchEulerDiscreteScheduler,  # flow-matching models only
}
FLOW_SAMPLERS = ("flow_euler",)
DEFAULT_SAMPLER = "dpm_solver++"  # of a diffusion model; a flow model's is FLOW_SAMPLERS[0]
Scheduler = DiscreteScheduler | FlowMatchEulerDiscreteScheduler
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
    sampler: str = DEFAULT_SAMPLER  # a flow-matching model's training run records flow_euler (default_sampler)
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


def is_flow_model(schedule: Mapping[str, Any], prediction_type: str) -> bool:
    """Whether a model with this schedule spec and prediction type was trained with flow matching."""
    return prediction_type == FLOW_PREDICTION or schedule.get("objective") == "flow_matching"


def default_sampler(schedule: Mapping[str, Any], prediction_type: str) -> str:
    """The sampler a model uses when its config names none: DPM-Solver++ (2M), or flow_euler for a flow model."""
    return FLOW_SAMPLERS[0] if is_flow_model(schedule, prediction_type) else DEFAULT_SAMPLER


def check_sampler(name: str, schedule: Mapping[str, Any], prediction_type: str) -> str:
    """``name`` if it is a sampler for this model; else a ConfigError that says which samplers fit and why."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {reprlib.repr(name)}; expected one of {sorted(SAMPLERS)}")
    flow = is_flow_model(schedule, prediction_type)
    if flow and name not in FLOW_SAMPLERS:
        raise ConfigError(f"sampler {name!r} steps a diffusion model's noise schedule, but this model was trained "
                          f"with flow matching (prediction_type={FLOW_PREDICTION!r}): use sampler="
                          f"{' or '.join(FLOW_SAMPLERS)}")
    if not flow and name in FLOW_SAMPLERS:
        others = sorted(set(SAMPLERS) - set(FLOW_SAMPLERS))
        raise ConfigError(f"sampler {name!r} integrates a flow-matching model's velocity, but this model predicts "
                          f"{prediction_type!r} on a {schedule.get('schedule', 'linear')} noise schedule: use one of "
                          f"{others}")
    return name


def make_scheduler(name: str, schedule: Mapping[str, Any], prediction_type: str,
                   latent_shape: Sequence[int] | None = None) -> Scheduler:
    """Build the named sampler for a model trained with ``schedule`` (NoiseSchedule.from_name keywords, or a flow
    model's ``FlowMatchingLoss.spec``).

    Spacing is ``trailing`` for DDPM/DDIM/Euler/Heun (it starts at the last training step, which zero-terminal-SNR
    models need) and the solvers' own ``linspace`` for DPM-Solver/UniPC; Karras variants take Karras levels between
    the same ends. x0 clipping is off (latents are not bounded to [-1, 1]). A flow model's sampler uses its training
    shift; with ``resolution_shift`` the shift follows from ``latent_shape`` ([C, H, W] or [B, C, H, W]), which
    must then be given.
    """
    check_sampler(name, schedule, prediction_type)
    T = schedule.get("num_train_timesteps", 1000)
    if name in FLOW_SAMPLERS:
        if schedule.get("resolution_shift"):
            if latent_shape is None:
                raise ConfigError("this flow model shifts its noise levels by resolution: make_scheduler needs "
                                  "latent_shape")
            return FlowMatchEulerDiscreteScheduler(T, use_dynamic_shifting=True)
        return FlowMatchEulerDiscreteScheduler(T, shift=float(schedule.get("shift", 1.0)))
    kw = dict(
        num_train_timesteps=T,
        beta_start=schedule.get("beta_start", 0.0001),
        beta_end=schedule.get("beta_end", 0.02),
        beta_schedule=schedule.get("schedule", "linear"),
        prediction_type=prediction_type,
    )
    zero_snr = schedule.get("rescale_betas_zero_snr", False)
    if name == "heun":
        if zero_snr:
            raise ConfigError("sampler 'heun' cannot start from a zero-terminal-SNR schedule (its first level is "
                              "infinite); use euler, dpm_solver++ or ddim")
        return HeunDiscreteScheduler(timestep_spacing="trailing", **kw)
    kw["rescale_betas_zero_snr"] = zero_snr
    if name in ("dpm_solver++", "dpm++_2m_karras"):
        return DPMSolverMultistepScheduler(use_karras_sigmas=name == "dpm++_2m_karras", **kw)
    if name == "unipc":
        return UniPCMultistepScheduler(**kw)
    if name == "euler":
        return EulerDiscreteScheduler(timestep_spacing="trailing", **kw)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **kw)
    return SAMPLERS[name](clip_sample=False, timestep_spacing="trailing", **kw)


def set_steps(scheduler: Scheduler, num_inference_steps: int, latent_shape: Sequence[int] | None = None) -> None:
    """``scheduler.set_timesteps(n)``, with the resolution's mu for a flow sampler that shifts by resolution."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.use_dynamic_shifting:
        h, w = latent_shape[-2:]
        scheduler.set_timesteps(num_inference_steps, mu=resolution_mu((h // 2) * (w // 2)))
    else:
        scheduler.set_timesteps(num_inference_steps)


def start_at(scheduler: Scheduler, steps: int, keep: int) -> None:
    """Cut the schedule to its last ``keep`` of ``steps`` steps (image-to-image), at a whole step: a second-order
    sampler (Heun) holds ``order`` timesteps a step."""
    scheduler.timesteps = scheduler.timesteps[(steps - keep) * scheduler.order:]


def strength_steps(steps: int, strength: float, scheduler: Scheduler | None = None) -> int:
    """The steps image-to-image runs of ``steps`` at ``strength``, as diffusers' img2img pipelines count them, and at
    least one (where diffusers would run none and fail): SD's ``int(steps * strength)``, or for a flow-matching
    ``scheduler`` SD3's and Flux's ``steps - int(steps - steps * strength)`` (one more where the product is not
    whole)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        kept = steps - int(max(steps - steps * strength, 0))
    else:
        kept = int(steps * strength)
    return min(steps, max(1, kept))


def forward_noise(scheduler: Scheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  step_index: int | None = None) -> torch.Tensor:
    """``clean`` latents noised to timestep ``t`` (one, or one per sample) by the forward process of the model's kind,
    in the sampler's own space: a flow model's (1 - s) x0 + s eps, a diffusion model's alpha x0 + sigma eps.
    ``step_index``: ``t`` is ``scheduler.timesteps[step_index]``, whose level the sigma samplers take by position."""
    t = t.expand(clean.shape[0]) if t.numel() == 1 else t
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler.scale_noise(clean, t, noise)
    if step_index is not None and isinstance(scheduler, SigmaSteps):  # the levels held by position
        return scheduler.add_noise(clean, noise, t, step_index=step_index)
    return scheduler.add_noise(clean, noise, t)


def noise_to_start(scheduler: Scheduler, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``clean`` latents noised to the level of the schedule's first timestep (image-to-image's start)."""
    return forward_noise(scheduler, clean, noise, scheduler.timesteps[:1])


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


def _step(scheduler: Scheduler, out: torch.Tensor, t: torch.Tensor, i: int, x: torch.Tensor, eta: float,
          generator: Generators):
    """One scheduler step at position ``i``; with one generator per image, each image's step noise comes from its
    own generator, drawn exactly when the sampler would draw it."""
    kw: dict[str, Any] = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if isinstance(scheduler, SigmaScheduler | DPMSolverMultistepScheduler | UniPCMultistepScheduler |
                  FlowMatchEulerDiscreteScheduler):
        kw["step_index"] = i
    per_image = generator is not None and not isinstance(generator, torch.Generator)
    if not per_image:
        if not isinstance(scheduler, HeunDiscreteScheduler):  # the one deterministic sampler without the keyword
            kw["generator"] = generator
        return scheduler.step(out, t, x.float(), **kw)
    if (isinstance(scheduler, DDPMScheduler) and int(t) > 0) or (isinstance(scheduler, DDIMScheduler) and eta > 0):
        kw["variance_noise"] = randn(tuple(out.shape), generator, out.device, out.dtype)
    elif isinstance(scheduler, EulerAncestralDiscreteScheduler):
        kw["noise"] = randn(tuple(out.shape), generator, out.device, out.dtype)
    elif isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.stochastic_sampling:
        kw["noise"] = randn(tuple(out.shape), generator, out.device, torch.float32)  # drawn as the step draws it
    return scheduler.step(out, t, x.float(), **kw)


@torch.no_grad()
def sample_loop(
    denoise: Denoiser,
    scheduler: Scheduler,
    latents: torch.Tensor,
    context: torch.Tensor | None,
    guidance: Callable[..., torch.Tensor] | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    post_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    **denoise_kwargs: torch.Tensor | None,
) -> torch.Tensor:
    """Denoise ``latents`` through ``scheduler.timesteps`` (already set, possibly cut for image-to-image).

    ``latents`` are in the sampler's space: pure noise times ``scheduler.init_noise_sigma`` to sample from scratch
    (:func:`noise_to_start` for image-to-image). Each step gives the network ``scheduler.scale_model_input(x, t)``
    and the timestep as the sampler holds it (fractional for the sigma samplers and flow models).
    ``guidance(denoise, x, t, context, **kwargs)`` gives the output the scheduler steps with
    (:class:`~ldm.diffusion.guidance.ClassifierFreeGuidance`, :class:`~ldm.diffusion.guidance.AutoGuidance`); None
    runs the conditional model alone. ``generator`` may be a list with one generator per image: the stochastic
    samplers' noise for image i then comes from generator i alone. ``callback(i, t, latents, x0_prediction)`` runs
    after each scheduler step (Heun: 2n - 1 of them for n steps). ``denoise_kwargs`` (e.g. class labels ``y``) go
    to every network call; None values are dropped. ``post_step(i, latents)`` replaces the latents after step i,
    before the callback (the inpainting blend of a model without mask inputs).
    """
    if scheduler.timesteps is None:
        raise ValueError("call scheduler.set_timesteps(n) before sample_loop")
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != latents.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {latents.shape[0]}: give one per image")
    guidance = guidance or ClassifierFreeGuidance()
    kwargs = {k: v for k, v in denoise_kwargs.items() if v is not None}
    x = latents
    integer = not torch.is_floating_point(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        value = int(t) if integer else float(t)
        tt = torch.full((x.shape[0],), value, device=x.device, dtype=torch.long if integer else torch.float32)
        if isinstance(scheduler, SigmaScheduler):
            model_in = scheduler.scale_model_input(x, t, step_index=i)
        else:
            model_in = scheduler.scale_model_input(x, t)
        result = _step(scheduler, guidance(denoise, model_in, tt, context, **kwargs), t, i, x, eta, generator)
        x = result.prev_sample
        if post_step is not None:
            x = post_step(i, x)
        if callback is not None:
            callback(i, value, x, result.pred_original_sample)
    return x
