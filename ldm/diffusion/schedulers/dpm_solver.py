"""DPM-Solver++ multistep (Lu et al., 2022): a second-order ODE solver in log-SNR time on x0 predictions.

Good images in 15-25 steps. Each inference position i has a noise level ``sigmas[i]`` (sigma = sqrt((1 - a) / a),
a = alpha_bar): the training table's value at ``timesteps[i]``, or with ``use_karras_sigmas`` the Karras et al.
(2022) schedule, whose timesteps are the (possibly repeated) table positions nearest those levels. The multistep
history is the x0 prediction at each position, kept per position (not behind a step counter) and resettable; it can
also be passed in explicitly (``prev_x0``), so repeating a step or resuming a loop gives the same numbers.

This module also holds what the multistep solvers share: the solver timestep spacings, Karras sigmas, and
:class:`SigmaSteps`, the per-position noise levels and history bookkeeping.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldm.diffusion.noise_schedule import NoiseSchedule
from ldm.diffusion.parameterization import split_prediction
from ldm.diffusion.schedulers.base import TIMESTEP_SPACINGS, DiscreteScheduler, SchedulerOutput
from ldm.diffusion.schedules import canonical_schedule_name, make_betas

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
KARRAS_RHO = 7.0  # the exponent of Karras et al. (2022)
ZERO_SNR_ALPHA_BAR = 2.0**-24  # a zero-SNR last step sits here: log-SNR must stay finite


def solver_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0,
                     last: int | None = None) -> np.ndarray:
    """Descending int64 timesteps of the multistep solvers: n + 1 points of the spacing rule with the clean end
    dropped (``last`` < T leaves out the noisiest timesteps, DPM-Solver's ``lambda_min_clipped``)."""
    T, n = num_train_timesteps, num_inference_steps
    last = T if last is None else last
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -T / n).round() - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}")
    ts = ts.astype(np.int64).copy()
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps outside [0, {T - 1}]; lower steps_offset")
    if len(np.unique(ts)) != len(ts):
        raise ValueError(f"{n} steps give repeated timesteps with {spacing!r} spacing; use fewer")
    return ts


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = KARRAS_RHO
                  ) -> np.ndarray:
    """The n descending noise levels of Karras et al. (2022): evenly spaced in sigma^(1/rho) from max to min."""
    ramp = np.linspace(0, 1, num_inference_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def float32_alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """alpha_bar as diffusers builds it, in float32 arithmetic (zero-SNR last step at 2^-24).

    Only used to map Karras sigmas to integer timesteps: those sit on rounding boundaries, and diffusers decides
    them with its float32 table, so the same table is needed to get the same timesteps.
    """
    spec = schedule.spec
    if spec is None:
        betas = schedule.betas.float()
    else:
        T, name = spec["num_train_timesteps"], canonical_schedule_name(spec["schedule"])
        if name == "linear":
            betas = torch.linspace(spec["beta_start"], spec["beta_end"], T, dtype=torch.float32)
        elif name == "scaled_linear":
            betas = torch.linspace(spec["beta_start"] ** 0.5, spec["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
        else:
            betas = make_betas(name, T).float()
        if spec["rescale_betas_zero_snr"]:
            root = torch.cumprod(1 - betas, dim=0).sqrt()
            first, last = root[0].clone(), root[-1].clone()
            alpha_bar = ((root - last) * (first / (first - last))) ** 2
            betas = 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    table = torch.cumprod(1 - betas, dim=0)
    if table[-1] == 0 or (spec is not None and spec["rescale_betas_zero_snr"]):
        table[-1] = ZERO_SNR_ALPHA_BAR
    return table


def karras_schedule(schedule: NoiseSchedule, num_inference_steps: int, round_timesteps: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of a Karras schedule spanning the training table's noise levels.

    Each sigma's timestep is its fractional position in the table (linear in log sigma), rounded, or truncated
    when ``round_timesteps`` is False (diffusers' DPM-Solver does that for the cosine schedule). Close levels can
    share a timestep; their sigmas still differ.
    """
    table = float32_alphas_cumprod(schedule)
    table_sigmas = (((1 - table) / table) ** 0.5).numpy()
    sigmas = karras_sigmas(float(table_sigmas[0]), float(table_sigmas[-1]), num_inference_steps)
    t = np.interp(np.log(np.maximum(sigmas, 1e-10)), np.log(table_sigmas), np.arange(len(table_sigmas)))
    if round_timesteps:
        t = t.round()
    return t.astype(np.int64), sigmas


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha, sigma_vp) of x = alpha x0 + sigma_vp eps for the noise level sigma = sigma_vp / alpha."""
    alpha = 1 / math.sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha


def log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma_vp) = -log(sigma); +inf at the clean end."""
    return -math.log(sigma) if sigma > 0 else math.inf


class SigmaSteps:
    """Per-position noise levels and step bookkeeping of the multistep solvers (mixed into a DiscreteScheduler).

    ``set_timesteps`` records the full schedule; assigning a tail of it to ``timesteps`` (image-to-image starts part
    way) keeps the matching ``sigmas`` and clears the history. Positions are counted in the full schedule, so the
    per-position rules (the last step's order, disabled correctors) do not move when the schedule is cut.
    A timestep that occurs more than once resolves to its first position not yet stepped; pass ``step_index`` to
    name one explicitly (e.g. to repeat such a step).
    """

    _timesteps: torch.Tensor | None = None
    _full_timesteps: torch.Tensor | None = None
    _full_sigmas: list[float] = []
    _offset: int = 0
    sigmas: torch.Tensor | None = None

    @property
    def timesteps(self) -> torch.Tensor | None:
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value: torch.Tensor | None) -> None:
        if value is None:
            self._timesteps = None
            return
        full = self._full_timesteps
        k = -1 if full is None else len(full) - len(value)
        if full is None or k < 0 or not torch.equal(full[k:].cpu(), torch.as_tensor(value).cpu()):
            raise ValueError(
                f"{type(self).__name__}.timesteps can only be cut to a tail of what set_timesteps chose (to start "
                "part way, as image-to-image does); call set_timesteps for another schedule"
            )
        self._timesteps = value
        self._offset = k
        self.sigmas = torch.tensor(self._full_sigmas[k:], dtype=torch.float32)
        self._reset_history()

    def _reset_history(self) -> None:  # pragma: no cover - every solver overrides it
        raise NotImplementedError

    def _stepped_positions(self) -> set[int]:  # pragma: no cover - every solver overrides it
        raise NotImplementedError

    def _set_schedule(self, timesteps: torch.Tensor, sigmas: list[float], device) -> None:
        """Install a full schedule: ``sigmas`` has one more entry than ``timesteps`` (the level after the last)."""
        self._full_timesteps = timesteps.cpu()
        self._full_sigmas = [float(s) for s in sigmas]
        self._timesteps = timesteps.to(device) if device is not None else timesteps
        self._offset = 0
        self.sigmas = torch.tensor(self._full_sigmas, dtype=torch.float32)
        self.num_inference_steps = len(timesteps)
        self._reset_history()

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  step_index: int | None = None) -> torch.Tensor:
        """Forward-noise clean samples: to the noise level of the schedule's position when every timestep is one of
        ``timesteps`` (image-to-image's start; with Karras sigmas that level is not the table's), else to the
        training table's level at the timesteps. ``step_index``: the level of that position of ``timesteps``, as
        diffusers' ``add_noise`` inside its loop (rounded Karras levels can repeat a timestep: its first position
        is another level)."""
        t = torch.as_tensor(timesteps).reshape(-1).cpu()
        if step_index is not None:
            levels = [self._full_sigmas[step_index + self._offset]] * len(t)
        elif self._timesteps is None or not all(bool((self._timesteps.cpu() == v).any()) for v in t):
            return super().add_noise(original_samples, noise, timesteps)
        else:
            ts = self._timesteps.cpu()
            levels = [self._full_sigmas[int((ts == v).nonzero()[0, 0]) + self._offset] for v in t]
        pairs = torch.tensor([alpha_sigma(s) for s in levels], dtype=original_samples.dtype,
                             device=original_samples.device)
        shape = (-1, *([1] * (original_samples.ndim - 1))) if len(levels) > 1 else ()
        return pairs[:, 0].reshape(shape) * original_samples + pairs[:, 1].reshape(shape) * noise

    def _position(self, timestep: float | torch.Tensor, step_index: int | None) -> int:
        """The full-schedule position of this step."""
        if self._timesteps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before step()")
        ts = self._timesteps.cpu()
        t = torch.as_tensor(timestep).cpu().reshape(())
        if step_index is not None:
            if isinstance(step_index, bool) or not isinstance(step_index, (int, np.integer)) or \
                    not 0 <= step_index < len(ts) or ts[step_index] != t:
                raise ValueError(f"step_index {step_index!r} does not hold timestep {t.item()} in the timesteps "
                                 f"{ts.tolist()}; pass the index of the timestep being stepped")
            return int(step_index) + self._offset
        hits = [int(h) for h in (ts == t).nonzero().flatten()]
        if not hits:
            raise ValueError(f"timestep {t.item()} is not among the scheduler's timesteps {ts.tolist()}; pass one of "
                             "scheduler.timesteps")
        if len(hits) == 1:
            return hits[0] + self._offset
        stepped = self._stepped_positions()
        for h in hits:
            if h + self._offset not in stepped:
                return h + self._offset
        raise ValueError(f"timestep {t.item()} occurs at positions {hits}, all already stepped; pass step_index= to "
                         "say which one to repeat, or call set_timesteps to start again")


class DPMSolverMultistepScheduler(SigmaSteps, DiscreteScheduler):
    """DPM-Solver++ (2M by default) with diffusers' keywords and numbers (``algorithm_type="dpmsolver++"``,
    midpoint solver). Orders 1 (DDIM-like) and 2 are supported; ``use_karras_sigmas`` uses Karras noise levels."""

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
        use_karras_sigmas: bool = False,
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
        self.use_karras_sigmas = use_karras_sigmas
        self.final_sigmas_type = final_sigmas_type
        self.lambda_min_clipped = lambda_min_clipped
        # The solver works in log-SNR; a zero-SNR last step would be -inf, so it sits at a tiny level instead.
        self._table = self.alphas_cumprod.clone()
        if self.schedule.has_zero_terminal_snr:
            self._table[-1] = ZERO_SNR_ALPHA_BAR
        self._x0_history: dict[int, torch.Tensor] = {}

    def _reset_history(self) -> None:
        self._x0_history = {}

    def _stepped_positions(self) -> set[int]:
        return set(self._x0_history)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose n timesteps (DPM-Solver's spacing rules: n + 1 points with the clean end dropped; or Karras noise
        levels) and their noise levels ``sigmas`` (n + 1, the last one the level after the final step)."""
        T = self.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or \
                not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], "
                             f"got {num_inference_steps!r}")
        n = int(num_inference_steps)
        table_sigmas = ((1 - self._table) / self._table).sqrt()
        if self.use_karras_sigmas:
            cosine = canonical_schedule_name(self.beta_schedule) == "cosine"
            ts, sigmas = karras_schedule(self.schedule, n, round_timesteps=not cosine)
            sigmas = sigmas.tolist()
        else:
            lam = 0.5 * (self._table.log() - (1 - self._table).log())
            clipped = int(torch.searchsorted(lam.flip(0), torch.tensor(self.lambda_min_clipped, dtype=lam.dtype)))
            ts = solver_timesteps(T, n, self.timestep_spacing, self.steps_offset, last=T - clipped)
            sigmas = table_sigmas[torch.from_numpy(ts)].tolist()
        final = 0.0 if self.final_sigmas_type == "zero" else float(table_sigmas[0])
        self._set_schedule(torch.from_numpy(ts), [*sigmas, final], device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        prev_x0: torch.Tensor | None = None,
        step_index: int | None = None,
    ) -> SchedulerOutput:
        """One solver step. The second-order update uses the x0 prediction made at the previous position of the
        schedule: ``prev_x0`` if given, else the one this scheduler recorded when it stepped from there.
        ``step_index`` (the index into ``timesteps``) is needed only to repeat a step at a repeated timestep."""
        p = self._position(timestep, step_index)
        first = p == self._offset  # no earlier step of this chain
        n = len(self._full_sigmas) - 1
        sig_s, sig_t = self._full_sigmas[p], self._full_sigmas[p + 1]
        alpha_s, sigma_s = alpha_sigma(sig_s)
        x0, _ = split_prediction(model_output, sample, alpha_s**2, self.prediction_type)
        self._x0_history[p] = x0

        last_is_first_order = p == n - 1 and (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        )
        use_second = self.solver_order == 2 and not first and not last_is_first_order
        if use_second and prev_x0 is None:
            prev_x0 = self._x0_history.get(p - 1)
            if prev_x0 is None:
                raise ValueError(
                    f"the second-order step at t={int(self._full_timesteps[p])} needs the x0 prediction of "
                    f"t={int(self._full_timesteps[p - 1])}: step through the timesteps in order, or pass prev_x0"
                )

        x = sample.float()
        if sig_t == 0:
            # The clean end: exp(-h) = 0 and the update returns the x0 prediction.
            prev = x0.float()
        else:
            alpha_t, sigma_t = alpha_sigma(sig_t)
            lam_s, lam_t = log_snr(sig_s), log_snr(sig_t)
            h = lam_t - lam_s
            decay = alpha_t * math.expm1(-h)  # alpha_t (exp(-h) - 1)
            prev = (sigma_t / sigma_s) * x - decay * x0.float()
            if use_second:
                r = (lam_s - log_snr(self._full_sigmas[p - 1])) / h
                prev = prev - 0.5 * decay * (x0.float() - prev_x0.float()) / r
        return SchedulerOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0)
