"""UniPC (Zhao et al., 2023): a multistep predictor-corrector solver of the diffusion ODE in log-SNR time.

Each step first corrects the sample it is given (UniC), using the model output just evaluated there together with
the sample and outputs of the previous positions, then predicts the next sample (UniP) from the outputs at this and
earlier positions. Both are exponential integrators whose polynomial terms are weighted through B(h)
(``bh1``: B(h) = h, ``bh2``: B(h) = e^h - 1). Orders 1-3; good images in 10-20 steps.

The history (the model outputs converted to x0 or noise predictions, and the corrected samples) is kept per position
of the schedule in a :class:`UniPCHistory`, reset by ``set_timesteps``; ``step()`` is a function of its inputs and
that history, which can also be passed in explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from ldm.diffusion.parameterization import split_prediction
from ldm.diffusion.schedulers.base import DiscreteScheduler, SchedulerOutput
from ldm.diffusion.schedulers.dpm_solver import (
    FINAL_SIGMAS_TYPES,
    ZERO_SNR_ALPHA_BAR,
    SigmaSteps,
    alpha_sigma,
    karras_schedule,
    log_snr,
    solver_timesteps,
)

SOLVER_TYPES = ("bh1", "bh2")


@dataclass
class UniPCHistory:
    """What UniPC remembers, by position in the full schedule: the converted model outputs (x0 predictions, or
    noise predictions with ``predict_x0=False``) and the corrected samples the predictor started from."""

    model_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    samples: dict[int, torch.Tensor] = field(default_factory=dict)


def _bh_weights(ratios: list[float], hh: float, solver_type: str, order: int, corrector: bool
                ) -> tuple[list[float], float]:
    """The weights of the divided differences, and B(h).

    With z = hh (-h for data prediction, h for noise prediction), g_k = z phi_{k+1}(z) (phi the exponential-integrator
    functions, g_1 = (e^z - 1)/z - 1, g_{k+1} = g_k / z - 1/(k+1)!) and b_k = k! g_k / B(h). The weights rho solve
    sum_j rho_j r_j^(k-1) = b_k over the nodes r (the earlier points' log-SNR offsets relative to h, plus 1 for
    the new point when correcting). Second-order prediction and first-order correction use rho = 1/2.
    """
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    g, fact, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(g * fact / b_h)
        fact *= k + 1
        g = g / hh - 1 / fact
    nodes = [*ratios, 1.0] if corrector else ratios
    if not nodes:
        return [], b_h
    if (corrector and order == 1) or (not corrector and order == 2):
        return [0.5], b_h
    size = len(nodes)
    R = np.array([[r**k for r in nodes] for k in range(size)], dtype=np.float64)
    return np.linalg.solve(R, np.array(b[:size])).tolist(), b_h


class UniPCMultistepScheduler(SigmaSteps, DiscreteScheduler):
    """UniPC with diffusers' keywords and numbers: ``solver_order`` 1-3, ``solver_type`` bh1/bh2, ``predict_x0``,
    ``lower_order_final``, ``disable_corrector`` (positions after which no correction is made),
    ``use_karras_sigmas``, ``final_sigmas_type``.

    The step into a zero final noise level is first order and returns the x0 prediction, whatever the settings
    (higher orders, bh1 and noise prediction are undefined there; diffusers returns NaN or fails in those cases).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Iterable[int] = (),
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
    ):
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"unknown solver_type {solver_type!r}; expected one of {list(SOLVER_TYPES)}")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}; expected one of "
                             f"{list(FINAL_SIGMAS_TYPES)}")
        disabled = list(disable_corrector)
        if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in disabled):
            raise ValueError(f"disable_corrector must list step positions (ints), got {disabled!r}")
        super().__init__(
            num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, False, 1.0,
            timestep_spacing, steps_offset, rescale_betas_zero_snr,
        )
        self.solver_order = solver_order
        self.predict_x0 = predict_x0
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.disable_corrector = frozenset(int(i) for i in disabled)
        self.use_karras_sigmas = use_karras_sigmas
        self.final_sigmas_type = final_sigmas_type
        self._table = self.alphas_cumprod.clone()
        if self.schedule.has_zero_terminal_snr:
            self._table[-1] = ZERO_SNR_ALPHA_BAR
        self.history = UniPCHistory()

    def _reset_history(self) -> None:
        self.history = UniPCHistory()

    def _stepped_positions(self) -> set[int]:
        return set(self.history.model_outputs)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose n timesteps (n + 1 points of the spacing rule with the clean end dropped, or Karras noise levels)
        and their noise levels ``sigmas`` (n + 1, the last one the level after the final step); clears the
        history."""
        T = self.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or \
                not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], "
                             f"got {num_inference_steps!r}")
        n = int(num_inference_steps)
        table_sigmas = ((1 - self._table) / self._table).sqrt()
        if self.use_karras_sigmas:
            ts, sigmas = karras_schedule(self.schedule, n, round_timesteps=True)
            sigmas = sigmas.tolist()
            final = sigmas[-1]
        else:
            ts = solver_timesteps(T, n, self.timestep_spacing, self.steps_offset)
            sigmas = table_sigmas[torch.from_numpy(ts)].tolist()
            final = float(table_sigmas[0])
        self._set_schedule(torch.from_numpy(ts), [*sigmas, 0.0 if self.final_sigmas_type == "zero" else final],
                           device)

    def _order_at(self, p: int) -> int:
        """The predictor's order at full position p: lowered near the end (``lower_order_final``) and while the
        history is still short (p - offset earlier steps)."""
        n = len(self._full_sigmas) - 1
        order = min(self.solver_order, n - p) if self.lower_order_final else self.solver_order
        return min(order, p - self._offset + 1)

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float) -> tuple[torch.Tensor, ...]:
        """(the solver's quantity, x0): the x0 prediction, or with ``predict_x0=False`` the noise prediction."""
        x0, eps = split_prediction(model_output, sample, alpha_sigma(sigma)[0] ** 2, self.prediction_type)
        return (x0 if self.predict_x0 else eps), x0

    def _update(self, x: torch.Tensor, p: int, q: int, order: int, hist: UniPCHistory,
                new_output: torch.Tensor | None) -> torch.Tensor:
        """The exponential-integrator update of ``x`` (at position p) to position q = p + 1 from the outputs at p,
        p - 1, ... (``order`` of them); correcting (``new_output`` = the output at q) adds the new point."""
        sig_s, sig_t = self._full_sigmas[p], self._full_sigmas[q]
        (alpha_s, sigma_s), (alpha_t, sigma_t) = alpha_sigma(sig_s), alpha_sigma(sig_t)
        m0 = hist.model_outputs[p].float()
        if sig_t == 0:  # the clean end: the x0 prediction
            return m0 if self.predict_x0 else (x - sigma_s * m0) / alpha_s
        if sig_t == sig_s:  # h = 0 (Karras levels with final_sigmas_type="sigma_min" end on sigma_min twice)
            return x
        lam_s, h = log_snr(sig_s), log_snr(sig_t) - log_snr(sig_s)
        ratios = [(log_snr(self._full_sigmas[p - k]) - lam_s) / h for k in range(1, order)]
        diffs = [(hist.model_outputs[p - k].float() - m0) / r for k, r in zip(range(1, order), ratios, strict=True)]
        corrector = new_output is not None
        hh = -h if self.predict_x0 else h
        rhos, b_h = _bh_weights(ratios, hh, self.solver_type, order, corrector)
        if self.predict_x0:
            base, scale = (sigma_t / sigma_s) * x - alpha_t * math.expm1(hh) * m0, alpha_t * b_h
        else:
            base, scale = (alpha_t / alpha_s) * x - sigma_t * math.expm1(hh) * m0, sigma_t * b_h
        terms = [rho * d for rho, d in zip(rhos, diffs, strict=False)]
        if corrector:
            terms.append(rhos[-1] * (new_output.float() - m0))
        return base - scale * sum(terms) if terms else base

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        step_index: int | None = None,
        history: UniPCHistory | None = None,
    ) -> SchedulerOutput:
        """Correct ``sample`` with ``model_output`` (unless it is the chain's first step or its correction is
        disabled), then predict the next sample. ``history`` defaults to the scheduler's own (``self.history``);
        ``step_index`` is needed only to repeat a step at a repeated timestep. ``generator`` is unused (UniPC is
        deterministic); it is accepted so that sampling loops can pass it to every scheduler."""
        hist = self.history if history is None else history
        p = self._position(timestep, step_index)
        converted, x0 = self._convert(model_output, sample, self._full_sigmas[p])
        x = sample.float()
        if p > self._offset and p - 1 not in self.disable_corrector:
            missing = [k for k in range(p - self._order_at(p - 1), p) if k not in hist.model_outputs]
            if missing or p - 1 not in hist.samples:
                raise ValueError(
                    f"correcting at t={int(self._full_timesteps[p])} needs the outputs of the previous steps: step "
                    "through the timesteps in order, or pass their history"
                )
            x = self._update(hist.samples[p - 1].float(), p - 1, p, self._order_at(p - 1), hist, converted)
        hist.model_outputs[p] = converted
        hist.samples[p] = x
        order = self._order_at(p)
        missing = [k for k in range(p - order + 1, p) if k not in hist.model_outputs]
        if missing:
            raise ValueError(
                f"the order-{order} step at t={int(self._full_timesteps[p])} needs the outputs of the previous steps: "
                "step through the timesteps in order, or pass their history"
            )
        prev = self._update(x, p, p + 1, order, hist, None)
        return SchedulerOutput(prev_sample=prev.to(model_output.dtype), pred_original_sample=x0)
