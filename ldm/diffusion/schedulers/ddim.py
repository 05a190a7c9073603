"""DDIM sampling (Song et al., 2021): deterministic at eta=0, DDPM-like at eta=1.

Unlike diffusers, the previous timestep is looked up in the timestep array, so ``linspace`` spacing is correct
(diffusers computes ``t - T // n``; see LESSONS.md).
"""

from __future__ import annotations

import torch

from ldm.diffusion.parameterization import eps_from_x0, split_prediction
from ldm.diffusion.schedulers.base import DiscreteScheduler, SchedulerOutput, draw_noise


class DDIMScheduler(DiscreteScheduler):
    """DDIM with diffusers' constructor keywords and numbers (``set_alpha_to_one`` chooses alpha_bar at the
    clean end: 1, or alpha_bar_0)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, clip_sample,
            clip_sample_range, timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )
        self.set_alpha_to_one = set_alpha_to_one
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """One DDIM step; with ``eta > 0`` one ``torch.randn`` is drawn from ``generator`` (or pass
        ``variance_noise``)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(prev_t, self.final_alpha_cumprod)

        x0, eps = split_prediction(model_output, sample, float(a_t), self.prediction_type)
        x0 = self._clip(x0)
        if use_clipped_model_output:
            eps = eps_from_x0(x0, sample, float(a_t))

        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance.sqrt()
        direction = float((1 - a_prev - std**2).clamp(min=0).sqrt()) * eps
        prev_sample = float(a_prev.sqrt()) * x0 + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = draw_noise(model_output, generator)
            prev_sample = prev_sample + float(std) * variance_noise
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
