"""UniPC, flow-matching Euler and DPM-Solver++ with Karras sigmas against diffusers (the oracle): same constructor
keywords, same model outputs (a fixed function of (x, t)) -> same timesteps, sigmas and samples at every step."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion.flow import resolution_shift  # noqa: E402
from ldm.diffusion.parameterization import split_prediction  # noqa: E402
from ldm.diffusion.schedulers.dpm_solver import DPMSolverMultistepScheduler  # noqa: E402
from ldm.diffusion.schedulers.flow_match import FlowMatchEulerDiscreteScheduler, resolution_mu  # noqa: E402
from ldm.diffusion.schedulers.unipc import UniPCHistory, UniPCMultistepScheduler  # noqa: E402
from ldm.errors import ConfigError  # noqa: E402
from tests.compat.test_schedulers_vs_diffusers import fake_model  # noqa: E402

RTOL = 1e-4
SCHEDULES = {"scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2")}


def _close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    assert torch.isfinite(got).all(), f"{what}: not finite"
    scale = max(1.0, expected.abs().max().item())
    diff = (got.float() - expected.float()).abs().max().item()
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} exceeds {rtol:g} x {scale:.3g}"


def _sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _model(x: torch.Tensor, t) -> torch.Tensor:
    """fake_model at a (possibly fractional) timestep; rounded so that both sides see the same float."""
    return fake_model(x, round(float(t), 3))


def _compare_chain(ours, ref, steps: int, set_kw: dict | None = None, begin: int = 0, rtol: float = RTOL,
                   int_timesteps: bool = True) -> None:
    """Set both schedulers' timesteps, compare timesteps and sigmas, then step both from the same inputs (the
    reference chain) and compare every step's sample. ``begin`` > 0 starts part way, as image-to-image does."""
    set_kw = set_kw or {}
    ours.set_timesteps(steps, **set_kw)
    ref.set_timesteps(steps, **set_kw)
    if int_timesteps:
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
    else:
        torch.testing.assert_close(ours.timesteps, ref.timesteps.float(), rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), rtol=RTOL, atol=1e-7)
    ref.set_begin_index(begin)  # diffusers otherwise starts at the second of repeated timesteps (see below)
    if begin:
        ours.timesteps = ours.timesteps[begin:]
    x = _sample()
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(ref.timesteps[begin:]):
        m = _model(x, t)
        kw_ref = {"generator": g_ref} if isinstance(ref, diffusers.FlowMatchEulerDiscreteScheduler) else {}
        expected = ref.step(m, t, x, **kw_ref).prev_sample
        got = ours.step(m, ours.timesteps[i], x, generator=g_ours).prev_sample
        _close(got, expected, f"step {i} (t={float(t):g})", rtol)
        x = expected
    assert torch.equal(g_ours.get_state(), g_ref.get_state())


# ------------------------------------------------------------------------------------------------ DPM-Solver++ Karras

DPM_KARRAS = [pytest.param(s, p, n, o, id=f"{s}-{p}-n{n}-o{o}")
              for s, p, n, o in itertools.product(SCHEDULES, ["epsilon", "v_prediction"], [1, 6, 20], [1, 2])]


@pytest.mark.parametrize("schedule,pred,steps,order", DPM_KARRAS)
def test_dpm_solver_karras_matches_diffusers(schedule, pred, steps, order):
    kw = dict(SCHEDULES[schedule], prediction_type=pred, solver_order=order, use_karras_sigmas=True)
    _compare_chain(DPMSolverMultistepScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw), steps)


@pytest.mark.parametrize("steps", [6, 20, 50])
def test_dpm_solver_karras_over_cosine_repeats_timesteps(steps):
    """Karras sigmas over the cosine table: its last few steps span sigma 10^2..10^4, so several Karras levels map to
    the same (truncated) timestep. Stepping the timesteps in order visits each position once; diffusers, left to
    itself, starts at the second of a repeated first timestep (and runs off the end), so it is started at 0."""
    kw = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", use_karras_sigmas=True)
    ours, ref = DPMSolverMultistepScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw)
    _compare_chain(ours, ref, steps)
    ts = ours.timesteps.tolist()
    assert len(set(ts)) < len(ts), "expected repeated timesteps"
    assert len(set(ours.sigmas.tolist())) == len(ts) + 1, "repeated timesteps must still have distinct sigmas"


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_dpm_solver_karras_final_sigma_and_zero_snr(final_sigmas_type, zero_snr):
    kw = dict(beta_schedule="linear", prediction_type="v_prediction", use_karras_sigmas=True,
              final_sigmas_type=final_sigmas_type, rescale_betas_zero_snr=zero_snr)
    _compare_chain(DPMSolverMultistepScheduler(**kw), diffusers.DPMSolverMultistepScheduler(**kw), 12)


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_karras_image_to_image_tail_and_add_noise(cls, schedule):
    """Cutting timesteps to a tail (image-to-image) keeps the matching sigmas (diffusers' set_begin_index), and
    add_noise at the tail's first timestep noises to that position's Karras level, as diffusers does."""
    kw = dict(SCHEDULES[schedule], prediction_type="v_prediction", use_karras_sigmas=True)
    ours_cls = {"DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
                "UniPCMultistepScheduler": UniPCMultistepScheduler}[cls]
    ours, ref = ours_cls(**kw), getattr(diffusers, cls)(**kw)
    _compare_chain(ours, ref, 20, begin=7)
    x0, noise = _sample(1), _sample(2)
    ref.set_timesteps(20)  # diffusers noises to its step counter's level once it has stepped: start it afresh
    ref.set_begin_index(7)
    expected = ref.add_noise(x0, noise, ref.timesteps[7:8].expand(2))
    _close(ours.add_noise(x0, noise, ours.timesteps[:1].expand(2)), expected, "add_noise")
    table = ours_cls(**kw).add_noise(x0, noise, ours.timesteps[:1].expand(2))  # no schedule set: the table's level
    t = int(ours.timesteps[0])
    a = ours.alphas_cumprod[t].float()
    torch.testing.assert_close(table, a.sqrt() * x0 + (1 - a).sqrt() * noise)


# ------------------------------------------------------------------------------------------------------------- UniPC

UNIPC = [pytest.param(s, p, n, o, k, id=f"{s}-{p}-n{n}-o{o}-{'karras' if k else 'table'}")
         for s, p, n, o, k in itertools.product(SCHEDULES, ["epsilon", "v_prediction"], [1, 6, 20], [2, 3],
                                                [False, True])]


@pytest.mark.parametrize("schedule,pred,steps,order,karras", UNIPC)
def test_unipc_matches_diffusers(schedule, pred, steps, order, karras):
    kw = dict(SCHEDULES[schedule], prediction_type=pred, solver_order=order, use_karras_sigmas=karras)
    _compare_chain(UniPCMultistepScheduler(**kw), diffusers.UniPCMultistepScheduler(**kw), steps)


@pytest.mark.parametrize("kw", [
    dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_type="bh1", final_sigmas_type="sigma_min", solver_order=3),
    dict(predict_x0=False, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, final_sigmas_type="sigma_min", solver_order=3, solver_type="bh1"),
    dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3),
    dict(disable_corrector=[0, 3, 4]),
    dict(solver_order=1),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, use_karras_sigmas=True),
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_unipc_variants_match_diffusers(kw):
    kw = dict(SCHEDULES["scaled_linear"], **kw)
    _compare_chain(UniPCMultistepScheduler(**kw), diffusers.UniPCMultistepScheduler(**kw), 10)


@pytest.mark.parametrize("kw", [dict(solver_type="bh1"), dict(predict_x0=False), dict(lower_order_final=False)])
def test_unipc_final_step_to_zero_is_the_x0_prediction(kw):
    """Into a zero final sigma these settings give NaN in diffusers (or a singular solve); ours take a first-order
    last step, which lands on the x0 prediction, and match diffusers everywhere before it."""
    kw = dict(SCHEDULES["scaled_linear"], **kw)
    ours, ref = UniPCMultistepScheduler(**kw), diffusers.UniPCMultistepScheduler(**kw)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    x = _sample()
    for i, t in enumerate(ref.timesteps):
        m = _model(x, t)
        out = ours.step(m, t, x)
        if i < len(ref.timesteps) - 1:
            expected = ref.step(m, t, x).prev_sample
            _close(out.prev_sample, expected, f"step {i}")
            x = expected
    if ours.predict_x0:
        _close(out.prev_sample, out.pred_original_sample, "last step")
    else:  # the x0 implied by the noise prediction at the corrected sample
        a = 1 / (float(ours.sigmas[-2]) ** 2 + 1)
        corrected = ours.history.samples[len(ours.timesteps) - 1]
        _close(out.prev_sample, split_prediction(m, corrected, a, "epsilon")[0], "last step")


def test_unipc_image_to_image_tail():
    kw = dict(SCHEDULES["squaredcos_cap_v2"], prediction_type="v_prediction", solver_order=3)
    _compare_chain(UniPCMultistepScheduler(**kw), diffusers.UniPCMultistepScheduler(**kw), 20, begin=5)


def _run(sched, steps: int, upto: int | None = None) -> list[torch.Tensor]:
    x, outs = _sample(3), []
    for t in sched.timesteps[:upto]:
        x = sched.step(_model(x, t), t, x).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("karras", [False, True])
def test_unipc_repeat_restart_and_explicit_history(karras):
    kw = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", solver_order=3,
              use_karras_sigmas=karras)
    sched = UniPCMultistepScheduler(**kw)
    sched.set_timesteps(12)
    first = _run(sched, 12, upto=5)
    sched.set_timesteps(12)  # starts clean: the same numbers again
    again = _run(sched, 12, upto=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    # Repeating step 5 (naming its position, as its timestep may repeat) gives the same numbers.
    ts, x = sched.timesteps, again[-1]
    a = sched.step(_model(x, ts[5]), ts[5], x, step_index=5).prev_sample
    b = sched.step(_model(x, ts[5]), ts[5], x, step_index=5).prev_sample
    assert torch.equal(a, b)

    # The history can be handed to another scheduler: step 5 is a function of its inputs and the history.
    saved = UniPCHistory(dict(sched.history.model_outputs), dict(sched.history.samples))
    other = UniPCMultistepScheduler(**kw)
    other.set_timesteps(12)
    c = other.step(_model(x, ts[5]), ts[5], x, step_index=5, history=saved).prev_sample
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="step through the timesteps in order"):
        other.step(_model(x, ts[6]), ts[6], x, step_index=6)


def test_unipc_repeated_timesteps_resolve_in_order():
    sched = UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    sched.set_timesteps(20)
    ts = sched.timesteps.tolist()
    assert ts[0] == ts[1]
    x = _sample()
    out0 = sched.step(_model(x, ts[0]), ts[0], x)
    assert set(sched.history.model_outputs) == {0}
    sched.step(_model(out0.prev_sample, ts[1]), ts[1], out0.prev_sample)
    assert set(sched.history.model_outputs) == {0, 1}
    with pytest.raises(ValueError, match="step_index"):
        sched.step(_model(x, ts[0]), ts[0], x, step_index=len(ts) - 1)  # that position holds another timestep


def test_unipc_and_dpm_reject_bad_settings():
    with pytest.raises(ValueError, match="solver_order"):
        UniPCMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="solver_type"):
        UniPCMultistepScheduler(solver_type="bh3")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        UniPCMultistepScheduler(final_sigmas_type="max")
    sched = UniPCMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1), 999, torch.zeros(1))
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="not among"):
        sched.step(torch.zeros(1), 5, torch.zeros(1))
    with pytest.raises(ValueError, match="tail"):
        sched.timesteps = sched.timesteps[:3]


# ------------------------------------------------------------------------------------------------ flow-matching Euler

FLOW = [pytest.param(shift, n, id=f"shift{shift}-n{n}") for shift, n in itertools.product([1.0, 3.0], [1, 6, 20, 28])]


@pytest.mark.parametrize("shift,steps", FLOW)
def test_flow_euler_matches_diffusers(shift, steps):
    _compare_chain(FlowMatchEulerDiscreteScheduler(shift=shift),
                   diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), steps, int_timesteps=False)


@pytest.mark.parametrize("kw,set_kw", [
    (dict(use_dynamic_shifting=True), dict(mu=resolution_mu(4096))),
    (dict(use_dynamic_shifting=True), dict(mu=0.3)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=2.0)),
    (dict(use_dynamic_shifting=True, shift_terminal=0.1), dict(mu=1.0)),
    (dict(shift=3.0, shift_terminal=0.05), {}),
    (dict(shift=3.0, use_karras_sigmas=True), {}),
    (dict(shift=2.0, invert_sigmas=True), {}),
    (dict(shift=3.0, stochastic_sampling=True), {}),
    (dict(shift=3.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1])),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_flow_euler_variants_match_diffusers(kw, set_kw):
    steps = None if "sigmas" in set_kw else 10
    _compare_chain(FlowMatchEulerDiscreteScheduler(**kw), diffusers.FlowMatchEulerDiscreteScheduler(**kw), steps,
                   set_kw=set_kw, int_timesteps=False)


def test_shift_terminal_with_one_step_is_refused_where_diffusers_gives_nan():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.05)
    ref.set_timesteps(1)
    assert torch.isnan(ref.sigmas[0])  # the stretch divides by 1 - 1
    ours = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.05)
    with pytest.raises(ConfigError, match=r"shift_terminal=0.05 .* last level is 1.0 \(num_inference_steps=1\): use "
                                          "at least 2 steps"):
        ours.set_timesteps(1)
    ours.set_timesteps(2)
    assert torch.isfinite(ours.sigmas).all()


def test_flow_euler_image_to_image_and_scale_noise():
    ours, ref = FlowMatchEulerDiscreteScheduler(shift=3.0), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    _compare_chain(ours, ref, 20, begin=8, int_timesteps=False)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x0, noise = _sample(1), _sample(2)
    t = ours.timesteps[8]
    _close(ours.scale_noise(x0, t.reshape(1), noise), ref.scale_noise(x0, ref.timesteps[8].reshape(1), noise),
           "scale_noise")
    per_sample = ours.timesteps[[3, 11]]
    s = ours.sigmas[[3, 11]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(ours.scale_noise(x0, per_sample, noise), (1 - s) * x0 + s * noise)
    with pytest.raises(ValueError, match="not among"):
        ours.scale_noise(x0, torch.tensor([123.456]), noise)


def test_flow_euler_step_is_stateless_and_restarts_clean():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    assert sched.init_noise_sigma == 1.0
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)
    x = _sample()
    t = sched.timesteps[2]
    a = sched.step(_model(x, t), t, x)
    b = sched.step(_model(x, t), t, x)
    assert torch.equal(a.prev_sample, b.prev_sample)
    # x0 from the velocity: x - s v.
    torch.testing.assert_close(a.pred_original_sample, x - sched.sigmas[2] * _model(x, t))
    first = _run(sched, 8)
    sched.set_timesteps(8)
    assert all(torch.equal(p, q) for p, q in zip(first, _run(sched, 8), strict=True))


def test_resolution_mu_is_the_sd3_flux_line():
    assert resolution_mu(256) == pytest.approx(0.5)
    assert resolution_mu(4096) == pytest.approx(1.15)
    for tokens in (64, 1024, 4096, 16384):
        assert math.exp(resolution_mu(tokens)) == pytest.approx(resolution_shift(tokens))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.2,
                                            base_image_seq_len=100, max_image_seq_len=1000)
    assert sched.mu_for(1000) == pytest.approx(1.2)
    assert sched.mu_for(550) == pytest.approx(0.75)


def test_flow_euler_rejects_bad_settings():
    with pytest.raises(ConfigError, match="mu"):
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ConfigError, match="shift"):
        FlowMatchEulerDiscreteScheduler(shift=0.0)
    with pytest.raises(ConfigError, match="time_shift_type"):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cubic")
    with pytest.raises(ConfigError, match="sigmas"):
        FlowMatchEulerDiscreteScheduler().set_timesteps(sigmas=[1.0, 1.5])
    with pytest.raises(ConfigError, match="num_inference_steps"):
        FlowMatchEulerDiscreteScheduler().set_timesteps(0)
