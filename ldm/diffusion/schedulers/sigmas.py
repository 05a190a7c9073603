"""What the sigma-space samplers (Euler, Euler ancestral, Heun) share: the noise-level table, inference levels and
the timesteps that go with them, and the scaled sample space they step in.

These samplers follow Karras et al. (2022): with sigma = sqrt((1 - a) / a) (a = alpha_bar) they step
x = x_t / sqrt(a) = x0 + sigma eps, an ODE whose only coefficient is sigma. The network still takes x_t, so
``scale_model_input`` divides x by sqrt(sigma^2 + 1), and the chain starts from noise of std ``init_noise_sigma``.
Inference timesteps are floats: the spacing rule's points (``linspace`` need not hit integers), or, with Karras
sigmas, each level's fractional position in the training table (linear in log sigma between neighbours).

The table is built as diffusers builds it (float32 alpha_bar, a zero-SNR last step at 2^-24): near t = 0 the
float32 rounding of 1 - alpha_bar moves sigma by ~3e-4 relative, and the same table is needed for the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm.diffusion.parameterization import split_prediction
from ldm.diffusion.schedulers.base import TIMESTEP_SPACINGS, DiscreteScheduler, spaced_timesteps
from ldm.diffusion.schedulers.dpm_solver import SigmaSteps, float32_alphas_cumprod, karras_sigmas
from ldm.errors import ConfigError

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
INTERPOLATION_TYPES = ("linear",)


def table_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The noise level sigma = sqrt((1 - a) / a) of every training timestep, ascending, in the table's dtype."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def sigma_to_timestep(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each noise level: its position in the ascending ``table``, linear in
    log sigma between the two neighbouring entries, clamped to [0, T - 1]."""
    log_table = np.log(table)  # in the table's dtype, as diffusers takes it
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(table) - 2)
    lo, hi = log_table[low].astype(np.float64), log_table[low + 1].astype(np.float64)
    w = np.clip((log_sigma - lo) / (hi - lo), 0, 1)
    return low + w


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0
                        ) -> np.ndarray:
    """Descending float timesteps of a spacing rule: ``linspace`` unrounded (n evenly spaced points of [0, T - 1]),
    ``leading`` and ``trailing`` as the other samplers space them."""
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_inference_steps)[::-1]
    else:
        ts = spaced_timesteps(num_train_timesteps, num_inference_steps, spacing, steps_offset).numpy()
    return ts.astype(np.float32).astype(np.float64)


class SigmaScheduler(SigmaSteps, DiscreteScheduler):
    """Base of the Euler-family samplers: the float32 sigma table, ``set_timesteps`` (levels interpolated from the
    table at the spacing rule's timesteps, or Karras levels between the same end points), input scaling and noising.

    Subclasses lay the levels out (``_layout``) and step. Steps are found by timestep value; a value that occurs
    more than once resolves to its first position not yet stepped (``step_index`` names one explicitly), and
    ``set_timesteps`` forgets everything stepped before.
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        prediction_type: str,
        timestep_spacing: str,
        steps_offset: int,
        rescale_betas_zero_snr: bool,
        use_karras_sigmas: bool,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of "
                              f"{list(TIMESTEP_SPACINGS)}")
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, clip_sample,
            clip_sample_range, timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self._table = table_sigmas(float32_alphas_cumprod(self.schedule))
        self._stepped: set[int] = set()

    def _reset_history(self) -> None:
        self._stepped = set()

    def _stepped_positions(self) -> set[int]:
        return self._stepped

    def _levels(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of the n inference steps, both float32 values (held as float64)."""
        T = self.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or \
                not 1 <= num_inference_steps <= T:
            raise ConfigError(f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], "
                              f"got {num_inference_steps!r}")
        n = int(num_inference_steps)
        ts = inference_timesteps(T, n, self.timestep_spacing, self.steps_offset)
        if ts.max() > T - 1 or ts.min() < 0:
            raise ConfigError(f"steps_offset={self.steps_offset} pushes timesteps outside [0, {T - 1}]; lower "
                              "steps_offset")
        sigmas = np.interp(ts, np.arange(T), self._table.astype(np.float64))
        if self.use_karras_sigmas:
            # Karras levels between the first and last inference step's levels; their timesteps follow from them.
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            ts = sigma_to_timestep(sigmas, self._table)
        as32 = lambda a: np.asarray(a).astype(np.float32).astype(np.float64)  # noqa: E731
        return as32(ts), as32(sigmas)

    @property
    def init_noise_sigma(self) -> float:
        """The std of the starting noise in the scaled space: the largest level, sqrt(sigma^2 + 1) of it with
        ``leading`` spacing (diffusers' convention)."""
        if self.sigmas is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before init_noise_sigma")
        top = max(self._full_sigmas)
        return top if self.timestep_spacing in ("linspace", "trailing") else float((top**2 + 1) ** 0.5)

    def sigma_at(self, timestep: float | torch.Tensor, step_index: int | None = None) -> float:
        """The noise level of the step at ``timestep`` (one of ``timesteps``)."""
        return self._full_sigmas[self._position(timestep, step_index)]

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None,
                          step_index: int | None = None) -> torch.Tensor:
        """The network's input x_t = x / sqrt(sigma^2 + 1) for the scaled sample x at ``timestep``."""
        if timestep is None:
            raise ValueError(f"{type(self).__name__}.scale_model_input needs the timestep: the scale depends on it")
        sigma = self.sigma_at(timestep, step_index)
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  step_index: int | None = None) -> torch.Tensor:
        """Noise clean samples into the scaled space: x0 + sigma noise, at the level of the schedule's position for a
        timestep of ``timesteps`` (image-to-image's start), else the table's level at that (fractional) timestep.
        ``step_index``: the level of that position of ``timesteps`` (a repeated timestep's first is another)."""
        t = torch.as_tensor(timesteps).reshape(-1).cpu()
        ts = None if self._timesteps is None else self._timesteps.cpu()
        levels = []
        for v in t:
            if step_index is not None:
                levels.append(self._full_sigmas[step_index + self._offset])
                continue
            hits = [] if ts is None else (ts == v).nonzero().flatten().tolist()
            if hits:
                levels.append(self._full_sigmas[hits[0] + self._offset])
            else:
                if not 0 <= float(v) <= self.num_train_timesteps - 1:
                    raise ValueError(f"timestep {float(v)} lies outside [0, {self.num_train_timesteps - 1}]")
                levels.append(float(np.interp(float(v), np.arange(len(self._table)), self._table)))
        s = torch.tensor(levels, dtype=original_samples.dtype, device=original_samples.device)
        s = s.reshape(-1, *([1] * (original_samples.ndim - 1))) if len(levels) > 1 else s.reshape(())
        return original_samples + s * noise

    def _denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
        """The x0 prediction for the scaled sample x at level sigma (the network saw x / sqrt(sigma^2 + 1))."""
        alpha_bar = 1 / (sigma**2 + 1)
        x0, _ = split_prediction(model_output, sample * alpha_bar**0.5, alpha_bar, self.prediction_type)
        return self._clip(x0)

    def previous_timestep(self, timestep: float | torch.Tensor) -> float:
        """The timestep after ``timestep`` in ``timesteps``, or -1 at the end."""
        p = self._position(timestep, None) - self._offset
        return float(self._timesteps[p + 1]) if p + 1 < len(self._timesteps) else -1.0


def check_final_sigmas_type(value: str) -> str:
    if value not in FINAL_SIGMAS_TYPES:
        raise ConfigError(f"unknown final_sigmas_type {value!r}; expected one of {list(FINAL_SIGMAS_TYPES)}")
    return value


def check_interpolation_type(value: str) -> str:
    if value not in INTERPOLATION_TYPES:
        raise ConfigError(
            f"interpolation_type {value!r} is not supported; use 'linear' (diffusers' 'log_linear' spaces the "
            "levels independently of the timesteps, so the network would see timesteps that do not match its input)"
        )
    return value
