"""The sampling loop with every named sampler against diffusers' canonical loop (the oracle): from scratch
(noise x init_noise_sigma, scale_model_input, the timestep as the sampler holds it, one step per timestep) and
image-to-image (the schedule cut at a whole step, the clean latents noised to its first level), for diffusion models
and for a flow-matching model, with the same network and generator."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm.convert.diffusers_format import schedule_to_diffusers  # noqa: E402
from ldm.diffusion.flow import resolution_shift, shift_sigmas  # noqa: E402
from ldm.diffusion.sampling import (  # noqa: E402
    FLOW_SAMPLERS,
    SAMPLERS,
    default_sampler,
    forward_noise,
    make_scheduler,
    noise_to_start,
    sample_loop,
    set_steps,
    start_at,
)
from ldm.diffusion.schedules import SD_SCHEDULE  # noqa: E402
from ldm.errors import ConfigError  # noqa: E402

COSINE = {"schedule": "cosine", "num_train_timesteps": 1000, "rescale_betas_zero_snr": False}  # the quickstart's
COSINE_ZERO_SNR = {**COSINE, "rescale_betas_zero_snr": True}
FLOW = {"objective": "flow_matching", "num_train_timesteps": 1000, "shift": 3.0, "resolution_shift": False}
SHAPE = (2, 4, 8, 8)


def reference(name: str, schedule: dict, prediction_type: str):
    """The diffusers scheduler our ``make_scheduler(name, ...)`` stands for."""
    if name == "flow_euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=schedule["shift"])
    kw = schedule_to_diffusers(schedule, prediction_type)
    if name == "heun":
        kw.pop("rescale_betas_zero_snr")
    return {
        "ddpm": lambda: diffusers.DDPMScheduler(clip_sample=False, timestep_spacing="trailing", **kw),
        "ddim": lambda: diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing", **kw),
        "dpm_solver++": lambda: diffusers.DPMSolverMultistepScheduler(**kw),
        "dpm++_2m_karras": lambda: diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **kw),
        "euler": lambda: diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", **kw),
        "euler_a": lambda: diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **kw),
        "heun": lambda: diffusers.HeunDiscreteScheduler(timestep_spacing="trailing", **kw),
        "unipc": lambda: diffusers.UniPCMultistepScheduler(**kw),
    }[name]()


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a trained model whose output depends on the (fractional) timestep."""
    t = t.float().reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t.float()
    return 0.4 * x * torch.cos(t / 700) + 0.3 * torch.sin(x + t / 300)


def _ours(name, schedule, prediction_type, steps, seed, clean=None, keep=None):
    scheduler = make_scheduler(name, schedule, prediction_type, latent_shape=SHAPE)
    set_steps(scheduler, steps, SHAPE)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    if clean is None:
        x = noise * scheduler.init_noise_sigma
    else:
        start_at(scheduler, steps, keep)
        x = noise_to_start(scheduler, clean, noise)
    calls = []
    out = sample_loop(lambda x, t, context: network(x, t), scheduler, x, None, generator=g,
                      callback=lambda i, t, x, x0: calls.append(t))
    return out, calls


def _reference(name, schedule, prediction_type, steps, seed, clean=None, keep=None):
    ds = reference(name, schedule, prediction_type)
    ds.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    timesteps = ds.timesteps
    if clean is None:
        x = noise * getattr(ds, "init_noise_sigma", 1.0)  # diffusers' flow sampler starts from the noise as it is
        if hasattr(ds, "set_begin_index"):
            # Karras levels on a zero-SNR schedule round to a repeated first timestep; without a begin index diffusers
            # starts at its second occurrence and runs off the end (ours counts positions, see SigmaSteps)
            ds.set_begin_index(0)
    else:
        begin = (steps - keep) * ds.order
        timesteps = ds.timesteps[begin:]
        if hasattr(ds, "set_begin_index"):
            ds.set_begin_index(begin)
        first = timesteps[:1].repeat(SHAPE[0])
        x = ds.scale_noise(clean, first, noise) if name in FLOW_SAMPLERS else ds.add_noise(clean, noise, first)
    kw = {} if name in ("heun", "unipc") else {"generator": g}  # deterministic: diffusers' take no generator
    for t in timesteps:
        model_in = x if name in FLOW_SAMPLERS else ds.scale_model_input(x, t)  # diffusers' flow sampler has none
        x = ds.step(network(model_in, t), t, x, **kw).prev_sample
    return x, [float(t) for t in timesteps]


DIFFUSION = sorted(set(SAMPLERS) - set(FLOW_SAMPLERS))
CASES = [pytest.param(name, SD_SCHEDULE, "epsilon", id=f"{name}-sd-eps") for name in DIFFUSION]
CASES += [pytest.param(name, COSINE, "v_prediction", id=f"{name}-cosine-v") for name in DIFFUSION]
CASES += [pytest.param(name, COSINE_ZERO_SNR, "v_prediction", id=f"{name}-cosine-zsnr-v")
          for name in DIFFUSION if name != "heun"]
CASES += [pytest.param("flow_euler", FLOW, "flow", id="flow_euler-shift3")]


@pytest.mark.parametrize(("name", "schedule", "prediction_type"), CASES)
@pytest.mark.parametrize("steps", [4, 10])
def test_from_noise_equals_diffusers(name, schedule, prediction_type, steps):
    ours, calls = _ours(name, schedule, prediction_type, steps, seed=steps)
    ref, ref_calls = _reference(name, schedule, prediction_type, steps, seed=steps)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-4)
    assert calls == pytest.approx(ref_calls, abs=1e-3)  # one callback per timestep: Heun's 2n - 1 included
    assert len(calls) == (2 * steps - 1 if name == "heun" else steps)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpm++_2m_karras", "unipc", "ddim", "flow_euler"])
def test_image_to_image_equals_diffusers(name):
    schedule, prediction_type = (FLOW, "flow") if name in FLOW_SAMPLERS else (SD_SCHEDULE, "epsilon")
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)) * 0.5
    ours, calls = _ours(name, schedule, prediction_type, 10, seed=1, clean=clean, keep=6)
    ref, ref_calls = _reference(name, schedule, prediction_type, 10, seed=1, clean=clean, keep=6)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-4)
    assert calls == pytest.approx(ref_calls, abs=1e-3)


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "flow_euler_stochastic"])
def test_a_generator_per_image_gives_each_image_what_diffusers_gives_it_alone(name):
    """With one generator per image, a stochastic sampler's step noise of image i comes from generator i alone
    (never torch's global generator): each image equals diffusers' loop on that image with that generator."""
    from ldm.diffusion.schedulers import FlowMatchEulerDiscreteScheduler

    flow = name.startswith("flow")
    ours_s = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True) if flow else \
        make_scheduler(name, SD_SCHEDULE, "epsilon", latent_shape=SHAPE)
    steps = 5
    set_steps(ours_s, steps, SHAPE)
    seeds = (3, 4)
    x = torch.cat([torch.randn(1, *SHAPE[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.manual_seed(0)  # anything drawn from the global generator would differ from diffusers' run
    batch = sample_loop(lambda x, t, context: network(x, t), ours_s, x * ours_s.init_noise_sigma, None,
                        generator=[torch.Generator().manual_seed(100 + s) for s in seeds])
    for i, seed in enumerate(seeds):
        ds = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True) if flow else \
            reference(name, SD_SCHEDULE, "epsilon")
        ds.set_timesteps(steps)
        g = torch.Generator().manual_seed(100 + seed)
        xi = x[i:i + 1] * getattr(ds, "init_noise_sigma", 1.0)
        for t in ds.timesteps:
            model_in = xi if flow else ds.scale_model_input(xi, t)
            xi = ds.step(network(model_in, t), t, xi, generator=g).prev_sample
        torch.testing.assert_close(batch[i:i + 1], xi, rtol=2e-4, atol=2e-4)


def test_noising_to_a_repeated_timestep_takes_the_level_of_its_position_as_diffusers_loop_does():
    """Rounded Karras levels repeat a timestep (t = 1 at 50 steps on the SD schedule). Inside diffusers' loop,
    ``add_noise`` takes the level of the step's position; so does ``forward_noise`` given it (the legacy inpainting
    blend), where a lookup by value would take the first occurrence's level."""
    ours = make_scheduler("dpm++_2m_karras", SD_SCHEDULE, "epsilon", latent_shape=SHAPE)
    set_steps(ours, 50, SHAPE)
    ds = reference("dpm++_2m_karras", SD_SCHEDULE, "epsilon")
    ds.set_timesteps(50)
    ts = ours.timesteps
    assert ts.tolist() == ds.timesteps.tolist()
    p = next(i for i in range(1, len(ts)) if ts[i] == ts[i - 1])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in ds.timesteps[:p]:  # diffusers' loop after p steps: its step index is p
        x = ds.step(network(x, t), t, x).prev_sample
    clean, noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), torch.randn(SHAPE)
    expected = ds.add_noise(clean, noise, ds.timesteps[p:p + 1])
    torch.testing.assert_close(forward_noise(ours, clean, noise, ts[p:p + 1], step_index=p), expected)
    assert not torch.allclose(forward_noise(ours, clean, noise, ts[p:p + 1]), expected, atol=1e-3)


def test_resolution_shift_follows_the_latent_size():
    spec = {**FLOW, "resolution_shift": True}
    for side in (8, 32, 64):
        shape = (1, 4, side, side)
        scheduler = make_scheduler("flow_euler", spec, "flow", latent_shape=shape)
        set_steps(scheduler, 5, shape)
        shift = resolution_shift((side // 2) ** 2)  # what the training loss used for these latents
        expected = shift_sigmas(torch.linspace(1.0, 1 / 1000, 5, dtype=torch.float64), shift)
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="needs latent_shape"):
        make_scheduler("flow_euler", spec, "flow")


def test_each_sampler_refuses_the_other_kind_of_model():
    assert default_sampler(FLOW, "flow") == "flow_euler" and default_sampler(SD_SCHEDULE, "epsilon") == "dpm_solver++"
    with pytest.raises(ConfigError, match="trained with flow matching.*use sampler=flow_euler"):
        make_scheduler("euler", FLOW, "flow")
    with pytest.raises(ConfigError, match="predicts 'epsilon'.*use one of"):
        make_scheduler("flow_euler", SD_SCHEDULE, "epsilon")
    with pytest.raises(ConfigError, match="heun.*zero-terminal-SNR"):
        make_scheduler("heun", COSINE_ZERO_SNR, "v_prediction")
    with pytest.raises(ConfigError, match="unknown sampler 'dpm'"):
        make_scheduler("dpm", SD_SCHEDULE, "epsilon")
