"""Euler ancestral sampling in sigma space: each step goes down past the next level, to sigma_down, and adds fresh
noise of std sigma_up back up to it (sigma_down^2 + sigma_up^2 = sigma_next^2), so every step samples the reverse
process rather than following the ODE. Shared conventions (scaled space, float timesteps): ``sigmas.py``.

Driven like :class:`~ldm.diffusion.schedulers.euler.EulerDiscreteScheduler`; every step draws one ``torch.randn`` of
the model output's shape from ``generator`` (the last one too, with sigma_up = 0), exactly as diffusers draws it, so
the same generator state gives the same samples.
"""

from __future__ import annotations

import torch

from ldm.diffusion.schedulers.base import SchedulerOutput, draw_noise
from ldm.diffusion.schedulers.sigmas import SigmaScheduler


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler ancestral with diffusers' keywords and numbers (and, beyond diffusers, ``sample`` prediction)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, timestep_spacing,
                         steps_offset, rescale_betas_zero_snr, use_karras_sigmas=False)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose n float ``timesteps`` and their levels ``sigmas`` (n + 1, ending at 0)."""
        ts, sigmas = self._levels(num_inference_steps)
        self._set_schedule(torch.tensor(ts, dtype=torch.float32), [*sigmas.tolist(), 0.0], device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        step_index: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """One ancestral step from ``timestep`` (a value of ``timesteps``): Euler down to sigma_down, then
        ``noise`` (drawn from ``generator`` when not given) times sigma_up."""
        p = self._position(timestep, step_index)
        self._stepped.add(p)
        sigma, sigma_next = self._full_sigmas[p], self._full_sigmas[p + 1]
        sigma_up = (sigma_next**2 * max(sigma**2 - sigma_next**2, 0.0) / sigma**2) ** 0.5
        sigma_down = sigma_next**2 / sigma  # = sqrt(sigma_next^2 - sigma_up^2)
        x = sample.float()
        x0 = self._denoised(model_output, x, sigma)
        prev = x + (x - x0) / sigma * (sigma_down - sigma)
        if noise is None:
            noise = draw_noise(model_output, generator)
        prev = prev + noise * sigma_up
        return SchedulerOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0)
