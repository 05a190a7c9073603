"""DPM-Solver++ multistep (Lu et al., 2022): a second-order ODE solver in log-SNR time on x0 predictions.

Good images in 15-25 steps. The multistep history is the x0 prediction at the previous timestep of the array; it is
kept per timestep (not behind a step counter), and can also be passed in explicitly (``prev_x0``), so repeating a
step or resuming a loop gives the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldm.diffusion.parameterization import split_prediction
from ldm.diffusion.schedulers.base import TIMESTEP_SPACINGS, DiscreteScheduler, SchedulerOutput

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class DPMSolverMultistepScheduler(DiscreteScheduler):
    """DPM-Solver++ (2M by default) with diffusers' keywords and numbers (``algorithm_type="dpmsolver++"``,
    midpoint solver). Orders 1 (DDIM-like) and 2 are supported."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        algorithm_type: str = "dpmsolver++",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
        if algorithm_type != "dpmsolver++":
            raise ValueError(f"only algorithm_type='dpmsolver++' is implemented, got {algorithm_type!r}")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}; expected one of {FINAL_SIGMAS_TYPES}")
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, False, 1.0,
            timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self.euler_at_final = euler_at_final
        self.final_sigmas_type = final_sigmas_type
        self.lambda_min_clipped = lambda_min_clipped
        # The solver works in log-SNR; a zero-SNR last step would be -inf, so it sits at a tiny level instead.
        self._table = self.alphas_cumprod.clone()
        if self.schedule.has_zero_terminal_snr:
            self._table[-1] = 2.0**-24
        self._x0_history: dict[int, torch.Tensor] = {}

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose n timesteps (DPM-Solver's spacing rules: n + 1 points with the clean end dropped)."""
        T = self.num_train_timesteps
        if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], "
                             f"got {num_inference_steps!r}")
        n = int(num_inference_steps)
        lam = 0.5 * (self._table.log() - (1 - self._table).log())
        clipped = int(torch.searchsorted(lam.flip(0), torch.tensor(self.lambda_min_clipped, dtype=lam.dtype)))
        last = T - clipped
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.arange(last, 0, -T / n).round() - 1
        else:  # pragma: no cover - validated in the constructor
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}")
        ts = torch.from_numpy(ts.astype(np.int64).copy())
        if len(torch.unique(ts)) != len(ts):
            raise ValueError(f"{n} steps give repeated timesteps with {self.timestep_spacing!r} spacing; use fewer")
        self.num_inference_steps = len(ts)
        self.timesteps = ts.to(device) if device is not None else ts
        self._x0_history = {}

    def _alpha_sigma(self, t: int) -> tuple[float, float]:
        """(alpha, sigma) of x_t = alpha x0 + sigma eps at timestep t; t = -1 is the end of the chain."""
        if t >= 0:
            a = float(self._table[t])
        elif self.final_sigmas_type == "zero":
            return 1.0, 0.0
        else:
            a = float(self._table[0])
        return math.sqrt(a), math.sqrt(1 - a)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        prev_x0: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """One solver step. The second-order update uses the x0 prediction made at the previous timestep of the
        array: ``prev_x0`` if given, else the one this scheduler recorded when it stepped from there."""
        t = int(timestep)
        i = self._index_of(t)
        n = len(self.timesteps)
        prev_t = self.previous_timestep(t)
        alpha_s, sigma_s = self._alpha_sigma(t)
        x0, _ = split_prediction(model_output, sample, float(self._table[t]), self.prediction_type)
        self._x0_history[t] = x0

        last_is_first_order = i == n - 1 and (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        )
        if self.solver_order == 2 and i > 0 and not last_is_first_order and prev_x0 is None:
            prev_x0 = self._x0_history.get(int(self.timesteps[i - 1]))
            if prev_x0 is None:
                raise ValueError(
                    f"the second-order step at t={t} needs the x0 prediction of t={int(self.timesteps[i - 1])}: "
                    "step through the timesteps in order, or pass prev_x0"
                )
        use_second = self.solver_order == 2 and i > 0 and not last_is_first_order

        alpha_t, sigma_t = self._alpha_sigma(prev_t)
        x = sample.float()
        lam_s = math.log(alpha_s) - math.log(sigma_s)
        if sigma_t == 0:
            # The clean end: exp(-h) = 0 and the update returns the x0 prediction.
            prev = x0.float()
        else:
            lam_t = math.log(alpha_t) - math.log(sigma_t)
            h = lam_t - lam_s
            decay = alpha_t * math.expm1(-h)  # alpha_t (exp(-h) - 1)
            prev = (sigma_t / sigma_s) * x - decay * x0.float()
            if use_second:
                a_p, s_p = self._alpha_sigma(int(self.timesteps[i - 1]))
                r = (lam_s - (math.log(a_p) - math.log(s_p))) / h
                prev = prev - 0.5 * decay * (x0.float() - prev_x0.float()) / r
        return SchedulerOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0)
