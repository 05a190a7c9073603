"""DPM-Solver++ multistep against diffusers' DPMSolverMultistepScheduler (algorithm_type="dpmsolver++")."""

from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion import DPMSolverMultistepScheduler  # noqa: E402
from tests.compat.test_schedulers_vs_diffusers import fake_model  # noqa: E402

CASES = [
    pytest.param(s, p, sp, z, o, n, id=f"{s}-{p}-{sp}-{'zsnr' if z else 'std'}-o{o}-n{n}")
    for s, p, sp, z, o, n in itertools.product(
        ["linear", "scaled_linear", "squaredcos_cap_v2"], ["epsilon", "v_prediction", "sample"],
        ["linspace", "leading", "trailing"], [False, True], [1, 2], [8, 20],
    )
    if not (z and p == "epsilon")
]


def _compare(kw: dict, steps: int, rtol: float = 1e-5) -> None:
    ours, ref = DPMSolverMultistepScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        m = fake_model(x, int(t))
        expected = ref.step(m, t, x).prev_sample
        got = ours.step(m, t, x).prev_sample
        scale = max(1.0, expected.abs().max().item())
        diff = (got - expected).abs().max().item()
        assert diff <= rtol * scale, f"t={int(t)}: max abs diff {diff:.3g} exceeds {rtol:g} x {scale:.3g}"
        x = expected


@pytest.mark.parametrize("schedule,pred,spacing,zero_snr,order,steps", CASES)
def test_dpm_solver_matches_diffusers(schedule, pred, spacing, zero_snr, order, steps):
    kw = dict(beta_schedule=schedule, prediction_type=pred, timestep_spacing=spacing,
              rescale_betas_zero_snr=zero_snr, solver_order=order)
    if schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    # diffusers keeps sigmas in float32; with 'sample' prediction near t = 0 that rounding is amplified.
    _compare(kw, steps, rtol=2e-4 if pred == "sample" else 1e-5)


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lambda_min_clipped", [-float("inf"), -5.1])
def test_dpm_solver_final_sigma_and_lambda_clip(final_sigmas_type, lambda_min_clipped):
    kw = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
              final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped)
    _compare(kw, 25)


def test_dpm_solver_step_can_be_repeated_and_history_passed_explicitly():
    sched = DPMSolverMultistepScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    sched.set_timesteps(10)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ts = sched.timesteps
    out0 = sched.step(fake_model(x, int(ts[0])), ts[0], x)
    x1 = out0.prev_sample
    a = sched.step(fake_model(x1, int(ts[1])), ts[1], x1).prev_sample
    b = sched.step(fake_model(x1, int(ts[1])), ts[1], x1).prev_sample  # repeated: same numbers
    assert torch.equal(a, b)
    fresh = DPMSolverMultistepScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    fresh.set_timesteps(10)
    c = fresh.step(fake_model(x1, int(ts[1])), ts[1], x1, prev_x0=out0.pred_original_sample).prev_sample
    assert torch.equal(a, c)
    fresh.set_timesteps(10)
    with pytest.raises(ValueError, match="needs the x0 prediction"):
        fresh.step(fake_model(x1, int(ts[2])), ts[2], x1)
