"""The sampling loop shared by the pipeline, the image-logging callback and the judge.

``sample_loop`` runs a scheduler over a denoiser with classifier-free guidance (unconditional and conditional halves
in one batched UNet call). It knows nothing of text or VAEs: it gets contexts and returns latents.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from ldm.diffusion import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from ldm.diffusion.guidance import autoguidance, classifier_free_guidance
from ldm.diffusion.samplers.base import DiscreteScheduler

SAMPLERS: dict[str, type[DiscreteScheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm_solver++": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, schedule: dict, prediction_type: str) -> DiscreteScheduler:
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


def _per_image_noise(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Noise shaped like ``like`` whose row i is one ``torch.randn`` from generator i (what batch 1 would draw)."""
    rows = [torch.randn((1, *like.shape[1:]), generator=g, dtype=like.dtype, device=g.device) for g in generators]
    return torch.cat(rows).to(like.device)


def check_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float]:
    """``(lo, hi)`` of a guidance interval, checked; None means every step, (-inf, inf)."""
    if interval is None:
        return -math.inf, math.inf
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two timesteps [lo, hi] (e.g. [400, 1000]) or null, got "
                         f"{interval!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"guidance_interval [lo, hi] needs 0 <= lo <= hi (timesteps, 0 = clean), got {interval!r}")
    return lo, hi


@torch.no_grad()
def sample_loop(
    denoise: Callable[..., torch.Tensor],
    scheduler: DiscreteScheduler,
    latents: torch.Tensor,
    context: torch.Tensor | None,
    uncond_context: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    guidance_interval: Sequence[float] | None = None,
    guide: Callable[..., torch.Tensor] | None = None,
    guide_context: torch.Tensor | None = None,
    autoguidance_scale: float = 1.0,
    **denoise_kwargs,
) -> torch.Tensor:
    """Denoise ``latents`` through ``scheduler.timesteps`` (already set, possibly truncated for image-to-image).

    ``denoise(x, t, context, **denoise_kwargs)`` is the network. With ``guidance_scale != 1`` the unconditional
    context must be given; a model without context (unconditional, pixel-space) samples with guidance 1 and a
    warning. ``generator`` may be a list with one generator per image: the stochastic samplers' noise for image i
    then comes from generator i alone. ``callback(i, t, latents, x0_prediction)`` runs after each step.

    ``guidance_interval=(lo, hi)`` guides only the steps whose timestep t (training units, 0 = clean) has
    lo <= t <= hi; the others run the conditional model alone, one UNet pass (Kynkaanniemi et al., 2024: guidance at
    low noise adds little adherence and costs detail). None guides every step.

    ``guide(x, t, guide_context)``, a weaker version of the model (an early snapshot), adds autoguidance at every
    step with ``autoguidance_scale`` > 1: ``(scale - 1) (cond - guide)``, one more network pass per step.
    """
    if scheduler.timesteps is None:
        raise ValueError("call scheduler.set_timesteps(n) before sample_loop")
    auto = autoguidance_scale != 1.0
    if autoguidance_scale < 1:
        raise ValueError(f"autoguidance_scale must be >= 1 (1 disables it), got {autoguidance_scale}")
    if auto and guide is None:
        raise ValueError(f"autoguidance_scale={autoguidance_scale} needs a guide model (a checkpoint trained with "
                         "ldm_stage.guide_snapshot_step); set autoguidance_scale=1 to sample without it")
    guided = guidance_scale != 1.0
    lo, hi = check_guidance_interval(guidance_interval)
    if guided and uncond_context is None:
        if context is not None:
            raise ValueError("guidance_scale != 1 needs the unconditional context (the encoding of the negative "
                             "prompt)")
        warnings.warn(f"no text context (an unconditional model): guidance_scale={guidance_scale} is ignored, "
                      "sampling with guidance 1", stacklevel=2)
        guided = False
    step_kw = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    per_image = generator is not None and not isinstance(generator, torch.Generator)
    if per_image and len(generator) != latents.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {latents.shape[0]}: give one per image")
    kwargs = {k: v for k, v in denoise_kwargs.items() if v is not None}
    doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}  # for the batched [uncond; cond] call
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if guided and lo <= int(t) <= hi:
            out = denoise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond_context, context]), **doubled)
            uncond, cond = out.float().chunk(2)
            out = classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)
        else:
            out = cond = denoise(x, tt, context, **kwargs).float()
        if auto:
            out = out + autoguidance(cond, guide(x, tt, guide_context, **kwargs).float(), autoguidance_scale)
        kw = dict(step_kw)
        if per_image:  # draw each image's step noise from its own generator, exactly when the sampler would
            draws = (isinstance(scheduler, DDPMScheduler) and int(t) > 0) or (
                isinstance(scheduler, DDIMScheduler) and eta > 0)
            if draws:
                kw["variance_noise"] = _per_image_noise(out, generator)
            result = scheduler.step(out, t, x.float(), **kw)
        else:
            result = scheduler.step(out, t, x.float(), generator=generator, **kw)
        x = result.prev_sample
        if callback is not None:
            callback(i, int(t), x, result.pred_original_sample)
    return x
