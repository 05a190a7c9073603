"""Euler sampling in sigma space (Karras et al., 2022, algorithm 2 with one model evaluation per step).

Each step moves the scaled sample x = x_t / sqrt(alpha_bar) along dx/dsigma = (x - x0_hat) / sigma from the step's
level to the next. ``s_churn`` > 0 first raises the level by a factor (1 + gamma) with fresh noise (the stochastic
sampler of that paper). Shared conventions (scaled space, float timesteps, Karras levels): ``sigmas.py``.

A caller drives it as diffusers' does::

    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:                      # float timesteps: give them to the network unrounded
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
"""

from __future__ import annotations

import torch

from ldm.diffusion.schedulers.base import SchedulerOutput, draw_noise
from ldm.diffusion.schedulers.sigmas import SigmaScheduler, check_final_sigmas_type, check_interpolation_type
from ldm.errors import ConfigError


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler with diffusers' keywords and numbers. ``final_sigmas_type`` is the level after the last step: 0, or
    the training table's smallest (``sigma_min``, which leaves that much noise in the result)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self.interpolation_type = check_interpolation_type(interpolation_type)
        self.final_sigmas_type = check_final_sigmas_type(final_sigmas_type)
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, timestep_spacing,
                         steps_offset, rescale_betas_zero_snr, use_karras_sigmas)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose n float ``timesteps`` and their levels ``sigmas`` (n + 1: the last is the level after the final
        step)."""
        ts, sigmas = self._levels(num_inference_steps)
        final = 0.0 if self.final_sigmas_type == "zero" else float(self._table[0])
        self._set_schedule(torch.tensor(ts, dtype=torch.float32), [*sigmas.tolist(), final], device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        step_index: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """One Euler step from ``timestep`` (a value of ``timesteps``) to the next level.

        With ``s_churn`` > 0 and s_tmin <= sigma <= s_tmax, the level is first raised to sigma (1 + gamma),
        gamma = min(s_churn / n, sqrt(2) - 1), by adding ``s_noise``-scaled ``noise`` (drawn when not given: one
        ``torch.randn`` from ``generator``). As in diffusers, an epsilon prediction is read at the raised level and
        a v prediction at the level the network saw. ``step_index`` (an index into ``timesteps``) names the step
        when a value repeats.
        """
        if s_churn < 0 or s_noise < 0:
            raise ConfigError(f"s_churn and s_noise must be >= 0, got s_churn={s_churn}, s_noise={s_noise}")
        p = self._position(timestep, step_index)
        self._stepped.add(p)
        sigma, sigma_next = self._full_sigmas[p], self._full_sigmas[p + 1]
        x = sample.float()
        gamma = min(s_churn / self.num_inference_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            if noise is None:
                noise = draw_noise(model_output, generator)
            x = x + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        x0 = self._denoised(model_output, x, sigma_hat if self.prediction_type == "epsilon" else sigma)
        derivative = (x - x0) / sigma_hat
        prev = x + derivative * (sigma_next - sigma_hat)
        return SchedulerOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0)
