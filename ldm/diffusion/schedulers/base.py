"""What every discrete-time sampler shares: the noise schedule, the inference timesteps, and validation.

Schedulers are stateless between steps: ``step()`` is a function of its inputs and of the timesteps chosen by
``set_timesteps`` (no hidden step counter), so a step can be repeated or run from several threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ldm.diffusion.noise_schedule import NoiseSchedule
from ldm.diffusion.parameterization import canonical_prediction_type

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerOutput:
    """The result of one sampler step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0):
    """Descending int64 inference timesteps for a spacing rule (the conventions of Lin et al., 2023, table 2)."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}")
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    return torch.from_numpy(ts.astype(np.int64).copy())


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One ``torch.randn`` of ``like``'s shape and dtype, drawn on the generator's device and moved to ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


class DiscreteScheduler:
    """Base of the DDPM/DDIM/DPM-Solver schedulers, with diffusers-compatible constructor keywords."""

    order = 1  # timesteps per step (Heun: 2); image-to-image cuts the schedule at a multiple of it

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.schedule = NoiseSchedule.from_name(
            beta_schedule, num_train_timesteps, beta_start, beta_end, rescale_betas_zero_snr
        )
        self.prediction_type = canonical_prediction_type(prediction_type)
        if rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr=True needs prediction_type 'v_prediction' or 'sample': epsilon prediction "
                "is undefined at the last timestep, where the input is pure noise"
            )
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {timestep_spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}"
            )
        if clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.schedule.alphas_cumprod

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the descending inference timesteps (stored in ``self.timesteps``, int64)."""
        if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool):
            raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must lie in [1, num_train_timesteps={T}], got {num_inference_steps}"
            )
        ts = spaced_timesteps(T, int(num_inference_steps), self.timestep_spacing, self.steps_offset)
        if ts.max() >= T or ts.min() < 0:
            raise ValueError(
                f"steps_offset={self.steps_offset} pushes timesteps outside [0, {T - 1}]; lower steps_offset"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = ts.to(device) if device is not None else ts

    def _index_of(self, timestep: int | torch.Tensor) -> int:
        if self.timesteps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before step()")
        t = int(timestep)
        hits = (self.timesteps.cpu() == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not among the scheduler's timesteps {self.timesteps.tolist()}")
        return int(hits[0, 0])

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after ``timestep`` in the inference sequence (looked up, not computed), or -1 at the end."""
        i = self._index_of(timestep)
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def _alpha_bar(self, t: int, final: float = 1.0) -> torch.Tensor:
        """float64 alpha_bar at t, or ``final`` for t < 0 (the clean end of the chain)."""
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(final, dtype=torch.float64)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean samples to ``timesteps`` (one per sample, or a scalar)."""
        return self.schedule.add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target for clean ``sample`` and ``noise`` at ``timesteps``."""
        return self.schedule.get_velocity(sample, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: these samplers work on unscaled x_t (kept for diffusers-style loops)."""
        return sample

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def __len__(self) -> int:
        return self.num_train_timesteps
