"""Beta schedules: the per-step noise variances of the forward process, computed in float64.

CompVis' "linear" is what this module (and diffusers) call ``scaled_linear`` (linear in sqrt(beta)); the alias
table below is the one place where schedule names are resolved.
"""

from __future__ import annotations

import math

import torch

SCHEDULE_ALIASES: dict[str, str] = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "cosine",
    "squaredcos_cap_v2": "cosine",
}

# Stable Diffusion 1.x/2.x train with scaled-linear betas 0.00085..0.012 over 1000 steps (CompVis' "linear"):
# NoiseSchedule.from_name keywords, the one place they are written.
SD_SCHEDULE = {"schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "rescale_betas_zero_snr": False}


def canonical_schedule_name(name: str) -> str:
    """Resolve a schedule name or alias to its canonical name, or raise a ValueError listing the choices."""
    try:
        return SCHEDULE_ALIASES[name]
    except KeyError:
        raise ValueError(
            f"unknown beta schedule {name!r}; expected one of {sorted(SCHEDULE_ALIASES)}"
        ) from None


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """The improved-DDPM cumulative signal level alpha_bar(t) for t in [0, 1] (Nichol & Dhariwal, 2021)."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(
    schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return the float64 betas of a named schedule.

    ``linear``: betas evenly spaced from beta_start to beta_end (the DDPM paper).
    ``scaled_linear``: sqrt(beta) evenly spaced (Stable Diffusion; CompVis calls it "linear").
    ``cosine``: betas derived from the cosine alpha_bar, clipped at ``max_beta`` (beta_start/end unused).
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    name = canonical_schedule_name(schedule)
    n = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    alpha_bar = cosine_alpha_bar(steps)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has zero SNR (alpha_bar_T = 0), keeping alpha_bar_0 (Lin et al., 2023).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged. A model trained
    on the result sees pure noise at t = T, which epsilon prediction cannot handle: use v or x0 prediction.
    """
    betas = betas.to(torch.float64)
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas
