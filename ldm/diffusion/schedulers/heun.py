"""Heun sampling in sigma space (Karras et al., 2022, algorithm 1): a second-order ODE solver with two model
evaluations per step. Shared conventions (scaled space, float timesteps, Karras levels): ``sigmas.py``.

Each step from level s_k to s_{k+1} is two calls of ``step``: the first (the *predictor*, at t_k) takes an Euler
step to s_{k+1} and records (x_k, d_k); the second (the *corrector*, at t_{k+1}, with the model evaluated on the
predictor's result) returns x_k + (s_{k+1} - s_k) (d_k + d_{k+1}) / 2. The last step, to level 0, is Euler alone.
So ``timesteps`` holds every timestep but the first twice, as diffusers' does, and a plain loop drives it::

    scheduler.set_timesteps(n)                         # 2n - 1 timesteps, 2n sigmas
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample

The predictor's record is kept per position of ``timesteps`` (even positions predict, odd ones correct), not in a
hidden counter: a step can be repeated (pass ``step_index`` to name a position whose timestep repeats), and
``set_timesteps`` starts clean. To start part way (image-to-image), cut ``timesteps`` at an even index.
"""

from __future__ import annotations

import torch

from ldm.diffusion.schedulers.base import SchedulerOutput
from ldm.diffusion.schedulers.sigmas import SigmaScheduler


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun with diffusers' keywords, defaults (Stable Diffusion's betas 0.00085..0.012) and numbers."""

    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, timestep_spacing,
                         steps_offset, False, use_karras_sigmas, clip_sample, clip_sample_range)
        self._predictions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _reset_history(self) -> None:
        super()._reset_history()
        self._predictions = {}

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose n steps: ``timesteps`` [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}] (2n - 1) and ``sigmas``
        [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0] (2n): position i's network input is at level ``sigmas[i]``."""
        ts, sigmas = self._levels(num_inference_steps)
        ts_layout = [ts[0], *[t for t in ts[1:] for _ in (0, 1)]]
        sigma_layout = [sigmas[0], *[s for s in sigmas[1:] for _ in (0, 1)], 0.0]
        self._set_schedule(torch.tensor(ts_layout, dtype=torch.float32), [float(s) for s in sigma_layout], device)
        self.num_inference_steps = int(num_inference_steps)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        step_index: int | None = None,
    ) -> SchedulerOutput:
        """The predictor or the corrector half of a Heun step, by the position of ``timestep`` in ``timesteps``
        (``step_index`` names the position when the value repeats and both were stepped already)."""
        p = self._position(timestep, step_index)
        self._stepped.add(p)
        if p % 2 == 0:  # predictor: an Euler step from sigmas[p] to sigmas[p + 1]
            sigma, sigma_next = self._full_sigmas[p], self._full_sigmas[p + 1]
            x0 = self._denoised(model_output, sample, sigma)
            derivative = (sample - x0) / sigma
            self._predictions[p] = (sample, derivative)
            return SchedulerOutput(prev_sample=sample + derivative * (sigma_next - sigma), pred_original_sample=x0)
        if p - 1 not in self._predictions:
            raise ValueError(
                f"the corrector at timesteps[{p - self._offset}] needs the predictor step before it: step through "
                "the timesteps in order, and cut timesteps only at an even index (image-to-image)"
            )
        origin, first_derivative = self._predictions[p - 1]
        sigma, sigma_next = self._full_sigmas[p - 1], self._full_sigmas[p]
        x0 = self._denoised(model_output, sample, sigma_next)
        derivative = ((sample - x0) / sigma_next + first_derivative) / 2
        return SchedulerOutput(prev_sample=origin + derivative * (sigma_next - sigma), pred_original_sample=x0)
