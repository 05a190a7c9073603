"""Euler sampling of a flow-matching (rectified flow) model, as SD3 and Flux sample: x_t = (1 - s) x0 + s eps, the
network predicts the velocity v = eps - x0, and a step moves x along v from noise level s to the next, s'.

The noise levels are evenly spaced timesteps mapped to (0, 1], moved toward the noisy end by a shift: a fixed one,
or one that grows with the image's token count (``use_dynamic_shifting``: SD3/Flux pass ``mu`` from
:func:`resolution_mu`). The model sees ``timesteps`` = s * ``num_train_timesteps`` (floats). diffusers' keywords and
numbers; stateless between steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldm.diffusion.flow import shift_sigmas
from ldm.diffusion.schedulers.base import SchedulerOutput, draw_noise
from ldm.diffusion.schedulers.dpm_solver import SigmaSteps, karras_sigmas
from ldm.errors import ConfigError

TIME_SHIFT_TYPES = ("exponential", "linear")


def resolution_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """SD3/Flux's resolution-dependent shift parameter mu: linear in the image's token count, base_shift at
    base_image_seq_len and max_shift at max_image_seq_len (the shift itself is exp(mu)). Larger images carry more
    redundant signal, so their noise levels are pushed toward the noisy end."""
    if max_image_seq_len == base_image_seq_len:
        raise ConfigError("max_image_seq_len must differ from base_image_seq_len (mu is a line through both)")
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return base_shift + slope * (image_seq_len - base_image_seq_len)


def time_shift(sigmas: np.ndarray, mu: float, kind: str = "exponential") -> np.ndarray:
    """Shift noise levels s in (0, 1] by mu: m / (m + (1/s - 1)) with m = exp(mu) (``exponential``) or mu
    (``linear``); at m = 1 nothing moves."""
    if kind not in TIME_SHIFT_TYPES:
        raise ConfigError(f"unknown time_shift_type {kind!r}; expected one of {list(TIME_SHIFT_TYPES)}")
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigmas - 1))


class FlowMatchEulerDiscreteScheduler(SigmaSteps):
    """The Euler sampler of flow-matching models with diffusers' keywords: ``shift`` (SD3 uses 3.0), dynamic
    shifting (``mu`` to ``set_timesteps``), ``shift_terminal`` (stretch so the last level is that value),
    ``use_karras_sigmas``, ``invert_sigmas``, ``stochastic_sampling`` (re-noise to the next level instead of moving
    along the velocity)."""

    init_noise_sigma = 1.0
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) or \
                num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        if not (math.isfinite(shift) and shift > 0):
            raise ConfigError(f"shift must be a finite number > 0, got {shift!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ConfigError(f"unknown time_shift_type {time_shift_type!r}; expected one of "
                              f"{list(TIME_SHIFT_TYPES)}")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ConfigError(f"shift_terminal must lie in [0, 1) (the last noise level), got {shift_terminal!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.use_dynamic_shifting = use_dynamic_shifting
        self.base_shift, self.max_shift = base_shift, max_shift
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.invert_sigmas = invert_sigmas
        self.shift_terminal = shift_terminal
        self.use_karras_sigmas = use_karras_sigmas
        self.time_shift_type = time_shift_type
        self.stochastic_sampling = stochastic_sampling
        self.num_inference_steps: int | None = None
        self.timesteps = None
        self._stepped: set[int] = set()
        # The range the inference levels span: 1 down to 1/T (that end shifted too without dynamic shifting, so a
        # fixed shift is applied twice to it, as in diffusers).
        lowest = 1 / self.num_train_timesteps
        self.sigma_max = 1.0
        self.sigma_min = lowest if use_dynamic_shifting else float(shift_sigmas(torch.tensor(lowest), shift))

    def _reset_history(self) -> None:
        self._stepped = set()

    def _stepped_positions(self) -> set[int]:
        return self._stepped

    def mu_for(self, image_seq_len: int) -> float:
        """mu for an image of ``image_seq_len`` tokens with this scheduler's base/max settings."""
        if self.base_shift is None or self.max_shift is None:
            raise ConfigError("mu_for needs base_shift and max_shift; set them or pass mu yourself")
        return resolution_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                             self.max_shift)

    def set_timesteps(self, num_inference_steps: int | None = None, device: torch.device | str | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None) -> None:
        """Choose the noise levels (``sigmas``, n + 1 with the final 0, or 1 with ``invert_sigmas``) and
        ``timesteps`` = levels x T. Pass ``sigmas`` (unshifted, in (0, 1]) to choose the levels yourself; ``mu``
        is required with dynamic shifting."""
        if self.use_dynamic_shifting and mu is None:
            raise ConfigError("use_dynamic_shifting=True needs mu: set_timesteps(n, mu=resolution_mu(tokens))")
        if sigmas is not None:
            levels = np.asarray(sigmas, dtype=np.float64)
            if levels.ndim != 1 or len(levels) == 0 or (levels <= 0).any() or (levels > 1).any():
                raise ConfigError("sigmas must be a non-empty 1-d list of noise levels in (0, 1]")
            if num_inference_steps is not None and num_inference_steps != len(levels):
                raise ConfigError(f"num_inference_steps={num_inference_steps} but {len(levels)} sigmas were given; "
                                  "pass one of them, or make them agree")
            n = len(levels)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or \
                    num_inference_steps < 1:
                raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            n = int(num_inference_steps)
            T = self.num_train_timesteps
            levels = np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T
        if self.use_dynamic_shifting:
            levels = time_shift(levels, mu, self.time_shift_type)
        else:
            levels = shift_sigmas(levels, self.shift)
        if self.shift_terminal:
            if levels[-1] >= 1:  # one level (or all) at 1: nothing to stretch (diffusers divides by zero: NaN)
                raise ConfigError(f"shift_terminal={self.shift_terminal} stretches the levels below 1 to end there, "
                                  f"but the last level is {float(levels[-1])} (num_inference_steps={n}): use at "
                                  "least 2 steps, or shift_terminal=None")
            # Stretch 1 - s so that the last level lands on shift_terminal.
            levels = 1 - (1 - levels) * (1 - self.shift_terminal) / (1 - levels[-1])
        if self.use_karras_sigmas:
            levels = karras_sigmas(float(levels[-1]), float(levels[0]), n)
        levels = levels.astype(np.float32).astype(np.float64)
        end = 0.0
        if self.invert_sigmas:
            levels, end = 1 - levels, 1.0
        timesteps = torch.tensor(levels * self.num_train_timesteps, dtype=torch.float32)
        self._set_schedule(timesteps, [*levels.tolist(), end], device)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: the network takes x_t as it is."""
        return sample

    def _sigma_of(self, timestep: float | torch.Tensor) -> float:
        return self._full_sigmas[self._position(timestep, None)]

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process at a timestep of the schedule: (1 - s) sample + s noise (image-to-image's start).
        ``timestep`` is one of ``timesteps``, or a [B] tensor of them (one per sample)."""
        t = torch.as_tensor(timestep).reshape(-1)
        levels = torch.tensor([self._full_sigmas[self._first_position(v)] for v in t], dtype=sample.dtype,
                              device=sample.device)
        s = levels.reshape(-1, *([1] * (sample.ndim - 1))) if len(levels) > 1 else levels.reshape(())
        return s * noise + (1 - s) * sample

    def _first_position(self, timestep: torch.Tensor) -> int:
        if self._timesteps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) first")
        hits = (self._timesteps.cpu() == timestep.cpu()).nonzero().flatten()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not among the scheduler's timesteps "
                             f"{self._timesteps.tolist()}; pass one of scheduler.timesteps")
        return int(hits[0]) + self._offset

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        step_index: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """One Euler step x' = x + (s' - s) v along the predicted velocity v = ``model_output``; with
        ``stochastic_sampling``, x' = (1 - s') x0 + s' eps' with fresh noise eps' (``noise`` when given, else one
        ``torch.randn`` from ``generator``). ``timestep`` is a value of ``timesteps`` (a float, not a loop index)."""
        p = self._position(timestep, step_index)
        self._stepped.add(p)
        s, s_next = self._full_sigmas[p], self._full_sigmas[p + 1]
        x = sample.float()
        v = model_output.float()
        x0 = x - s * v
        if self.stochastic_sampling:
            eps = draw_noise(x, generator) if noise is None else noise.to(x.device, x.dtype)
            prev = (1 - s_next) * x0 + s_next * eps
        else:
            prev = x + (s_next - s) * v
        return SchedulerOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0.to(model_output.dtype))

    def __len__(self) -> int:
        return self.num_train_timesteps
