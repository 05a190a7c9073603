"""The sigma-space samplers (Euler, Euler ancestral, Heun) against diffusers' (the oracle): timesteps, sigmas,
init_noise_sigma, scaled model inputs and every step's outputs, for the same model and generator state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion.noise_schedule import NoiseSchedule  # noqa: E402
from ldm.diffusion.parameterization import make_prediction  # noqa: E402
from ldm.diffusion.schedulers.euler import EulerDiscreteScheduler  # noqa: E402
from ldm.diffusion.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler  # noqa: E402
from ldm.diffusion.schedulers.heun import HeunDiscreteScheduler  # noqa: E402
from ldm.errors import ConfigError  # noqa: E402

PAIRS = {
    "euler": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler),
    "heun": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler),
}
RTOL = 1e-4
SHAPE = (2, 3, 6, 6)


CASES = [
    pytest.param(*case, id="-".join(str(c) for c in case))
    for case in itertools.product(
        PAIRS, ["scaled_linear", "squaredcos_cap_v2"], ["epsilon", "v_prediction"], [1, 7, 25], [False, True],
        ["linspace", "leading", "trailing"],
    )
    if not (case[4] and case[0] == "euler_ancestral")  # diffusers' ancestral sampler has no Karras option
]


class FakeDenoiser:
    """A deterministic stand-in for a network: from its input x_t and the (float) timestep t it guesses
    x0 = 0.8 tanh(x_t) + t-dependent random bias, and outputs the eps / v / x0 that guess implies at t's noise level
    (so samples stay of the size a real model keeps them, and the output depends on both inputs)."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str):
        self.alpha_bar = schedule.alphas_cumprod.numpy()
        self.prediction_type = prediction_type
        self.bias = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = float(t)
        a = float(np.interp(t, np.arange(len(self.alpha_bar)), self.alpha_bar))
        x0 = 0.8 * torch.tanh(x_in) + 0.3 * np.sin(t / 97.0) * self.bias
        eps = (x_in - a**0.5 * x0) / (1 - a) ** 0.5
        return make_prediction(x0, eps, a, self.prediction_type).float()


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, *inputs: torch.Tensor) -> None:
    """Equal within RTOL of the largest magnitude involved (float32 steps lose precision relative to their inputs:
    a step from sigma 2e4 to 5 cancels numbers ~1e4 down to ~10)."""
    scale = max([1.0, ref.abs().max().item(), *(x.abs().max().item() for x in inputs)])
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= RTOL * scale, f"{what}: max abs diff {diff:.3g} exceeds {RTOL:g} x {scale:.3g}"


def _kwargs(name, schedule, pred, karras, spacing, **extra):
    kw = dict(beta_schedule=schedule, prediction_type=pred, timestep_spacing=spacing, **extra)
    if schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    if name != "euler_ancestral":
        kw["use_karras_sigmas"] = karras
    return kw


def _check_schedule(ours, ref) -> None:
    assert len(ours.timesteps) == len(ref.timesteps)
    assert ours.timesteps.dtype == torch.float32
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=RTOL, atol=RTOL)
    assert len(ours.sigmas) == len(ref.sigmas)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), rtol=RTOL, atol=1e-7)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=RTOL)


def _run_both(ours, ref, model, steps, step_kwargs=None, start=0):
    """Set both to ``steps`` steps and run the chain from the same noise, each step from the same input sample and
    model output; compare everything and return the final samples."""
    step_kwargs = step_kwargs or {}
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    _check_schedule(ours, ref)
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    gen = {} if isinstance(ours, HeunDiscreteScheduler) else {"generator": g_ours}
    gen_ref = {} if isinstance(ours, HeunDiscreteScheduler) else {"generator": g_ref}
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(ref.init_noise_sigma)
    if start:
        ours.timesteps = ours.timesteps[start:]
        ref.set_begin_index(start)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps[start:], strict=True):
        x_in = ref.scale_model_input(x, t_ref)
        _close(ours.scale_model_input(x, t_ours), x_in, f"scaled input at t={float(t_ref)}")
        out = model(x_in, t_ref)
        got = ours.step(out, t_ours, x, **gen, **step_kwargs)
        expected = ref.step(out, t_ref, x, **gen_ref, **step_kwargs)
        _close(got.pred_original_sample, expected.pred_original_sample, f"x0 at t={float(t_ref)}", x)
        _close(got.prev_sample, expected.prev_sample, f"prev_sample at t={float(t_ref)}", x)
        x = expected.prev_sample
    assert torch.equal(g_ours.get_state(), g_ref.get_state()), "the generators drew different amounts of noise"
    return x


@pytest.mark.parametrize("name,schedule,pred,steps,karras,spacing", CASES)
def test_matches_diffusers(name, schedule, pred, steps, karras, spacing):
    kw = _kwargs(name, schedule, pred, karras, spacing)
    ours_cls, ref_cls = PAIRS[name]
    ours = ours_cls(**kw)
    _run_both(ours, ref_cls(**kw), FakeDenoiser(ours.schedule, pred), steps)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_zero_terminal_snr_v_prediction(name, spacing):
    kw = _kwargs(name, "scaled_linear", "v_prediction", False, spacing, rescale_betas_zero_snr=True)
    ours_cls, ref_cls = PAIRS[name]
    ours = ours_cls(**kw)
    _run_both(ours, ref_cls(**kw), FakeDenoiser(ours.schedule, "v_prediction"), 10)


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_final_sigmas_type(final_sigmas_type, karras):
    kw = _kwargs("euler", "scaled_linear", "epsilon", karras, "leading", steps_offset=1,
                 final_sigmas_type=final_sigmas_type)
    ours = EulerDiscreteScheduler(**kw)
    _run_both(ours, diffusers.EulerDiscreteScheduler(**kw), FakeDenoiser(ours.schedule, "epsilon"), 12)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler_churn_draws_noise_as_diffusers(pred):
    """s_churn > 0: one torch.randn per churned step from the generator, read at the same levels as diffusers."""
    kw = _kwargs("euler", "scaled_linear", pred, False, "linspace")
    ours = EulerDiscreteScheduler(**kw)
    _run_both(ours, diffusers.EulerDiscreteScheduler(**kw), FakeDenoiser(ours.schedule, pred), 10,
              dict(s_churn=2.0, s_tmin=0.2, s_tmax=8.0, s_noise=1.003))


def test_heun_sample_prediction_with_clipping():
    kw = dict(beta_schedule="scaled_linear", prediction_type="sample", clip_sample=True, clip_sample_range=0.5,
              use_karras_sigmas=True)
    ours = HeunDiscreteScheduler(**kw)
    _run_both(ours, diffusers.HeunDiscreteScheduler(**kw), FakeDenoiser(ours.schedule, "sample"), 8)


@pytest.mark.parametrize("name,start", [("euler", 3), ("euler_ancestral", 2), ("heun", 4)])
def test_starting_part_way_matches_diffusers(name, start):
    """Image-to-image cuts ``timesteps`` to a tail (for Heun at an even index: order x steps skipped)."""
    kw = _kwargs(name, "scaled_linear", "epsilon", name == "heun", "leading")
    ours_cls, ref_cls = PAIRS[name]
    ours = ours_cls(**kw)
    _run_both(ours, ref_cls(**kw), FakeDenoiser(ours.schedule, "epsilon"), 8, start=start)


@pytest.mark.parametrize("name", ["euler", "heun"])  # diffusers' ancestral sampler has no Karras option
def test_karras_over_cosine_table(name):
    """Karras levels over the cosine table: sigma_max is ~2e4 (its last beta is capped at 0.999), so most levels sit
    at t ~ 998-999, at distinct fractional timesteps that match diffusers'."""
    kw = _kwargs(name, "squaredcos_cap_v2", "v_prediction", True, "linspace")
    ours_cls, ref_cls = PAIRS[name]
    ours, ref = ours_cls(**kw), ref_cls(**kw)
    ours.set_timesteps(30)
    ref.set_timesteps(30)
    _check_schedule(ours, ref)
    distinct = torch.unique(ours.timesteps)
    assert len(distinct) == 30  # Heun repeats each but the first by design; the levels themselves are distinct
    assert (ours.timesteps[:10] > 990).all() and ours.sigmas[0] > 1e4


@pytest.mark.parametrize("name", list(PAIRS))
def test_repeated_step_and_fresh_set_timesteps_give_same_numbers(name):
    kw = _kwargs(name, "scaled_linear", "v_prediction", name != "euler_ancestral", "linspace")
    sched = PAIRS[name][0](**kw)
    model = FakeDenoiser(sched.schedule, "v_prediction")

    def chain(repeat_each: bool) -> list[torch.Tensor]:
        sched.set_timesteps(6)
        g = torch.Generator().manual_seed(3)
        gen = {} if name == "heun" else {"generator": g}
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
        outs = []
        for i, t in enumerate(sched.timesteps):
            out = model(sched.scale_model_input(x, t, step_index=i), t)
            if repeat_each:
                state = g.get_state()
                first = sched.step(out, t, x, step_index=i, **gen).prev_sample
                g.set_state(state)  # the ancestral sampler draws noise: same draws for the repeat
            nxt = sched.step(out, t, x, step_index=i, **gen).prev_sample
            if repeat_each:
                assert torch.equal(first, nxt), f"repeating step {i} changed its result"
            x = nxt
            outs.append(x)
        return outs

    once = chain(False)
    again = chain(True)  # set_timesteps again: nothing of the first chain carries over
    for a, b in zip(once, again, strict=True):
        assert torch.equal(a, b)


def test_heun_history_is_per_position_and_reset_by_set_timesteps():
    sched = HeunDiscreteScheduler(use_karras_sigmas=True)
    model = FakeDenoiser(sched.schedule, "epsilon")
    sched.set_timesteps(5)
    ts = sched.timesteps
    assert len(ts) == 9 and len(sched.sigmas) == 10 and torch.equal(ts[1], ts[2])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * sched.init_noise_sigma
    x1 = sched.step(model(sched.scale_model_input(x, ts[0]), ts[0]), ts[0], x).prev_sample
    out1 = model(sched.scale_model_input(x1, ts[1]), ts[1])
    corrected = sched.step(out1, ts[1], x1).prev_sample  # position 1: the corrector of step 0
    # ts[1] again resolves to position 2 (the next predictor), which is a different update ...
    predicted = sched.step(out1, ts[1], x1).prev_sample
    assert not torch.equal(corrected, predicted)
    # ... while naming position 1 repeats the corrector exactly.
    assert torch.equal(sched.step(out1, ts[1], x1, step_index=1).prev_sample, corrected)
    sched.set_timesteps(5)  # a fresh start forgets the predictor
    with pytest.raises(ValueError, match="needs the predictor step"):
        sched.step(out1, ts[1], x1, step_index=1)
    with pytest.raises(ValueError, match="even index"):
        sched.timesteps = sched.timesteps[1:]
        sched.step(out1, sched.timesteps[0], x1)


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="interpolation_type"):
        EulerDiscreteScheduler(interpolation_type="log_linear")
    with pytest.raises(ConfigError, match="final_sigmas_type"):
        EulerDiscreteScheduler(final_sigmas_type="one")
    with pytest.raises(ConfigError, match="timestep_spacing"):
        HeunDiscreteScheduler(timestep_spacing="uniform")
    sched = EulerAncestralDiscreteScheduler()
    with pytest.raises(ConfigError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(SHAPE), 999.0, torch.zeros(SHAPE))
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="not among"):
        sched.step(torch.zeros(SHAPE), 500.5, torch.zeros(SHAPE))
