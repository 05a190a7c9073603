"""Ancestral DDPM sampling (Ho et al., 2020): sample x_{t'} from the posterior q(x_{t'} | x_t, x0_hat)."""

from __future__ import annotations

import torch

from ldm.diffusion.parameterization import split_prediction
from ldm.diffusion.schedulers.base import DiscreteScheduler, SchedulerOutput, draw_noise

VARIANCE_TYPES = ("fixed_small", "fixed_large")


class DDPMScheduler(DiscreteScheduler):
    """DDPM with diffusers' constructor keywords and numbers; ``variance_type`` picks the posterior variance
    (``fixed_small``: beta tilde) or beta itself (``fixed_large``)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; expected one of {list(VARIANCE_TYPES)}")
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, clip_sample,
            clip_sample_range, timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )
        self.variance_type = variance_type

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """One reverse step from ``timestep`` to the next inference timestep.

        Noise is drawn (one ``torch.randn`` from ``generator``) whenever ``timestep > 0``, as in diffusers; pass
        ``variance_noise`` to supply it instead.
        """
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(prev_t)
        alpha_t = a_t / a_prev  # the product of (1 - beta) over the skipped steps
        beta_t = 1 - alpha_t

        x0, _ = split_prediction(model_output, sample, float(a_t), self.prediction_type)
        x0 = self._clip(x0)
        # Posterior mean of q(x_{t'} | x_t, x0): a convex-like blend of x0 and x_t.
        coef_x0 = float(a_prev.sqrt() * beta_t / (1 - a_t))
        coef_xt = float(alpha_t.sqrt() * (1 - a_prev) / (1 - a_t))
        prev_sample = coef_x0 * x0 + coef_xt * sample

        if t > 0:
            if variance_noise is None:
                variance_noise = draw_noise(model_output, generator)
            if self.variance_type == "fixed_small":
                variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
            else:
                variance = beta_t
            prev_sample = prev_sample + float(variance.sqrt()) * variance_noise
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
