"""Property tests of the diffusion math: schedules, parameterizations, and the DDIM inversion identity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.diffusion import DDIMScheduler, NoiseSchedule, convert_prediction, make_prediction, split_prediction

SCHEDULES = ["linear", "scaled_linear", "cosine"]
KINDS = ["epsilon", "v_prediction", "sample"]


def _tensors(seed: int, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("T", [10, 1000])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(schedule, zero_snr, T):
    s = NoiseSchedule.from_name(schedule, T, rescale_betas_zero_snr=zero_snr)
    a = s.alphas_cumprod
    assert (a[1:] < a[:-1]).all()
    assert (a <= 1).all() and (a >= 0).all()
    assert a.dtype == torch.float64
    assert s.has_zero_terminal_snr == zero_snr


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_zero_snr_rescale_keeps_first_level(schedule):
    plain = NoiseSchedule.from_name(schedule)
    rescaled = NoiseSchedule.from_name(schedule, rescale_betas_zero_snr=True)
    torch.testing.assert_close(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-12, atol=0)
    assert rescaled.alphas_cumprod[-1] == 0
    assert rescaled.snr()[-1] == 0


@settings(max_examples=60, deadline=None)
@given(t=st.integers(0, 999), seed=st.integers(0, 2**16), schedule=st.sampled_from(SCHEDULES),
       kind=st.sampled_from(KINDS))
def test_true_target_recovers_x0_and_noise(t, seed, schedule, kind):
    """Feeding the exact target of any prediction type back through the layer recovers x0 and the noise."""
    s = NoiseSchedule.from_name(schedule)
    x0, noise = _tensors(seed)
    tt = torch.full((x0.shape[0],), t)
    x_t = s.add_noise(x0, noise, tt)
    a = s.alpha_bar(tt, like=x0)
    target = make_prediction(x0, noise, a, kind)
    x0_hat, eps_hat = split_prediction(target, x_t, a, kind)
    # Recovering x0 from epsilon divides by sqrt(alpha_bar): the tolerance scales with the noise level.
    tol = 1e-9 / float(a.min().sqrt())
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=tol)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-9 / float((1 - a.max()).sqrt()))


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 998), seed=st.integers(0, 2**16), src=st.sampled_from(KINDS), dst=st.sampled_from(KINDS))
def test_conversions_round_trip(t, seed, src, dst):
    s = NoiseSchedule.from_name("cosine")
    out, x_t = _tensors(seed)
    a = s.alpha_bar(torch.full((out.shape[0],), t), like=out)
    there = convert_prediction(out, x_t, a, src, dst)
    back = convert_prediction(there, x_t, a, dst, src)
    torch.testing.assert_close(back, out, rtol=1e-7, atol=1e-7)


def test_velocity_is_the_v_target():
    s = NoiseSchedule.from_name("scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = _tensors(0)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(s.get_velocity(x0, noise, t), make_prediction(x0, noise, s.alpha_bar(t, x0), "v"))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize("kind", KINDS)
def test_ddim_eta0_with_oracle_model_maps_x_T_back_to_x0(spacing, steps, kind):
    """A model that returns the true target makes DDIM (eta=0) a deterministic path back to x0 exactly."""
    sched = DDIMScheduler(beta_schedule="cosine", timestep_spacing=spacing, prediction_type=kind, clip_sample=False)
    sched.set_timesteps(steps)
    x0, noise = _tensors(1)
    x = sched.add_noise(x0, noise, sched.timesteps[:1].repeat(x0.shape[0]))
    for t in sched.timesteps:
        a = sched.schedule.alpha_bar(int(t))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that takes x0 to the current x
        x = sched.step(make_prediction(x0, eps, a, kind), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-8)


def test_ddim_linspace_uses_the_looked_up_previous_timestep():
    """linspace spacing gives uneven gaps (999, 832, 666, ... for n=7); the step must land on the next timestep in the
    array, not on t - T // n as diffusers computes."""
    sched = DDIMScheduler(timestep_spacing="linspace", clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(7)
    ts = sched.timesteps.tolist()
    assert ts == [999, 832, 666, 500, 333, 166, 0]  # numpy rounds half to even
    x0, noise = _tensors(2)
    for i, t in enumerate(ts):
        assert sched.previous_timestep(t) == (ts[i + 1] if i + 1 < len(ts) else -1)
    # One step from 832 with the true noise lands exactly on x_666 (the diffusers formula would land on x_690).
    x = sched.add_noise(x0, noise, 832)
    out = sched.step(noise, 832, x).prev_sample
    torch.testing.assert_close(out, sched.add_noise(x0, noise, 666), rtol=0, atol=1e-10)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_step_is_pure_and_repeatable(spacing):
    sched = DDIMScheduler(timestep_spacing=spacing)
    sched.set_timesteps(5)
    x, m = _tensors(3)
    t = sched.timesteps[2]
    a = sched.step(m, t, x, eta=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    sched.step(m, sched.timesteps[0], x)  # an unrelated step in between changes nothing
    b = sched.step(m, t, x, eta=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(a, b)
