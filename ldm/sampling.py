"""The sampling loop shared by the pipeline, the image-logging callback and the judge.

``sample_loop`` runs a scheduler over a denoiser with classifier-free guidance (unconditional and conditional halves
in one batched UNet call). It knows nothing of text or VAEs: it gets contexts and returns latents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.diffusion import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from ldm.diffusion.guidance import classifier_free_guidance
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
    generator: torch.Generator | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    **denoise_kwargs,
) -> torch.Tensor:
    """Denoise ``latents`` through ``scheduler.timesteps`` (already set, possibly truncated for image-to-image).

    ``denoise(x, t, context, **denoise_kwargs)`` is the network. With ``guidance_scale != 1`` the unconditional
    context must be given. ``callback(i, t, latents, x0_prediction)`` runs after each step.
    """
    if scheduler.timesteps is None:
        raise ValueError("call scheduler.set_timesteps(n) before sample_loop")
    guided = guidance_scale != 1.0
    if guided and uncond_context is None:
        raise ValueError("guidance_scale != 1 needs the unconditional context (the encoding of the negative prompt)")
    step_kw = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if guided:
            extra = {k: torch.cat([v, v]) for k, v in denoise_kwargs.items() if v is not None}
            out = denoise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond_context, context]), **extra)
            uncond, cond = out.float().chunk(2)
            out = classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)
        else:
            out = denoise(x, tt, context, **{k: v for k, v in denoise_kwargs.items() if v is not None}).float()
        result = scheduler.step(out, t, x.float(), generator=generator, **step_kw)
        x = result.prev_sample
        if callback is not None:
            callback(i, int(t), x, result.pred_original_sample)
    return x
