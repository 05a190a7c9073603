"""Loss, guidance, timestep embedding, and the bad-input errors of the diffusion core."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import (
    AutoGuidance,
    ClassifierFreeGuidance,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionLoss,
    NoiseSchedule,
    classifier_free_guidance,
    loss_weights,
    make_betas,
    sample_timesteps,
)
from ldm.nn.embeddings import timestep_embedding

# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_constructor_arguments_name_the_choices(cls):
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'.*cosine"):
        cls(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="unknown prediction type 'noise'.*v_prediction"):
        cls(prediction_type="noise")
    with pytest.raises(ValueError, match="unknown timestep_spacing 'even'.*trailing"):
        cls(timestep_spacing="even")
    with pytest.raises(ValueError, match="epsilon prediction is undefined"):
        cls(rescale_betas_zero_snr=True, prediction_type="epsilon")


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_step_counts_and_order(cls):
    sched = cls(num_train_timesteps=100)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"set_timesteps\(num_inference_steps\) before step"):
        sched.step(x, 99, x)
    for n in (0, -3, 101):
        with pytest.raises(ValueError, match=r"\[1, num_train_timesteps=100\]"):
            sched.set_timesteps(n)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 55 is not among"):
        sched.step(x, 55, x)


def test_ddpm_rejects_unknown_variance_type():
    with pytest.raises(ValueError, match="fixed_small"):
        DDPMScheduler(variance_type="learned_range")


def test_make_betas_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas("linear", 0)


# ---------------------------------------------------------------- loss


def test_loss_uses_the_right_target_for_each_prediction_type():
    """An oracle denoiser that outputs the exact target gets zero loss, for every type and weighting."""
    s = NoiseSchedule.from_name("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([1, 100, 500, 998])
    for kind, oracle in {
        "epsilon": lambda x_t, tt, c: noise,
        "v": lambda x_t, tt, c: s.get_velocity(x0, noise, tt),
        "x0": lambda x_t, tt, c: x0,
    }.items():
        for weighting in ("uniform", "min_snr"):
            loss = DiffusionLoss(s, prediction_type=kind, weighting=weighting)
            assert loss(oracle, x0, t=t, noise=noise).item() < 1e-10
            assert loss(lambda *a: torch.zeros_like(x0), x0, t=t, noise=noise).item() > 1e-3


def test_bf16_latents_are_noised_in_float32():
    """Latents in bf16 (a VAE under autocast, an FSDP-cast batch): the forward process and the target are computed
    in float32, and the denoiser gets x_t in bf16. In bf16, alpha_bar rounds to 1 at the first timesteps of SD's
    schedule: x_t would be x0 with no noise at all."""
    from ldm.diffusion.flow import FlowMatchingLoss
    from ldm.diffusion.schedules import SD_SCHEDULE

    s = NoiseSchedule.from_name(**SD_SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g).bfloat16()
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 2, 3, 500])
    a = s.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    want_v = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    seen = {}

    def denoise(x_t, tt, c):
        seen["x_t"] = x_t
        return want_v.to(x_t.dtype)  # the exact target, rounded to the model's dtype

    loss = DiffusionLoss(s, prediction_type="v")(denoise, x0, t=t, noise=noise.bfloat16())
    assert seen["x_t"].dtype == torch.bfloat16
    noise_b = noise.bfloat16().double()  # the noise as the caller gave it
    want_x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise_b
    assert torch.allclose(seen["x_t"].double(), want_x_t, rtol=2**-8, atol=1e-6)  # one bf16 rounding of the input
    assert not torch.equal(seen["x_t"][:3], x0[:3])  # the first timesteps are noised
    assert loss.item() < 1e-4  # the target in float32: the oracle's bf16 rounding is all that is left

    sigma = torch.tensor([0.001, 0.3, 0.5, 0.999])
    flow_seen = {}
    FlowMatchingLoss()(lambda x_t, tt, c: flow_seen.setdefault("x_t", x_t), x0, sigma=sigma, noise=noise.bfloat16())
    sig = sigma.double().view(-1, 1, 1, 1)
    want = (1 - sig) * x0.double() + sig * noise_b
    assert flow_seen["x_t"].dtype == torch.bfloat16
    assert torch.allclose(flow_seen["x_t"].double(), want, rtol=2**-8, atol=1e-6)


def test_min_snr_weights():
    snr = torch.tensor([0.1, 1.0, 5.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weights(snr, "epsilon", "min_snr", 5.0), torch.tensor([1, 1, 1, 0.05]).double())
    expected_v = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    torch.testing.assert_close(loss_weights(snr, "v", "min_snr", 5.0), expected_v)
    torch.testing.assert_close(loss_weights(snr, "x0", "min_snr", 5.0), torch.tensor([0.1, 1, 5, 5]).double())
    assert torch.equal(loss_weights(snr, "epsilon"), torch.ones_like(snr))
    with pytest.raises(ValueError, match="uniform"):
        loss_weights(snr, "epsilon", "p2")


def test_loss_draws_t_and_noise_reproducibly_and_supports_offset_noise():
    s = NoiseSchedule.from_name("linear")
    x0 = torch.randn(8, 4, 4, 4)
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    loss = DiffusionLoss(s, prediction_type="v", offset_noise=0.1)
    a = loss(lambda x, t, c: net(x), x0, generator=torch.Generator().manual_seed(5))
    b = loss(lambda x, t, c: net(x), x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    a.backward()
    assert net.weight.grad.abs().sum() > 0
    # Offset noise adds one constant per (sample, channel): the per-channel means spread out.
    zeros = torch.zeros(256, 4, 8, 8)
    plain = DiffusionLoss(s).sample_noise(zeros, torch.Generator().manual_seed(0))
    offset = DiffusionLoss(s, offset_noise=1.0).sample_noise(zeros, torch.Generator().manual_seed(0))
    assert offset.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()


def test_timestep_shift_moves_training_timesteps_to_the_noisy_end():
    # shift 1 is the plain uniform draw, bit for bit (runs that do not set it draw what they always drew)
    plain = sample_timesteps(1000, 1000, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(3)))
    t = sample_timesteps(400_000, 1000, 2.0, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) == 999
    # SD3's shift s u / (1 + (s - 1) u) with s = 2: P(t >= 800) = 1 - 0.8 / 1.2 = 1/3, P(t < 200) = 0.2 / 1.8 = 1/9
    assert (t >= 800).double().mean().item() == pytest.approx(1 / 3, abs=0.005)
    assert (t < 200).double().mean().item() == pytest.approx(1 / 9, abs=0.005)
    means = [sample_timesteps(20_000, 1000, s, torch.Generator().manual_seed(1)).double().mean() for s in (1, 2, 4)]
    assert means[0] < means[1] < means[2]
    with pytest.raises(ValueError, match="timestep shift must be a finite number > 0"):
        DiffusionLoss(NoiseSchedule.from_name("linear"), timestep_shift=0.0)
    # the loss draws its timesteps with the shift
    seen = []
    loss = DiffusionLoss(NoiseSchedule.from_name("cosine"), prediction_type="v", timestep_shift=4.0)
    loss(lambda x, t, c: seen.append(t) or x, torch.randn(4096, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    # s = 4: P(t >= 500) = 1 - 0.5 / 2.5 = 0.8
    assert (seen[0] >= 500).double().mean().item() == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weighting="min_snr", snr_gamma=float("nan")), "min-SNR gamma must be a finite number > 0, got nan"),
    (dict(offset_noise=float("nan")), "offset_noise must be a finite number >= 0, got nan"),
    (dict(offset_noise=float("inf")), "offset_noise must be a finite number >= 0, got inf"),
    (dict(timestep_shift=float("nan")), "timestep shift must be a finite number > 0, got nan"),
    (dict(timestep_shift=float("inf")), "timestep shift must be a finite number > 0, got inf"),
])
def test_loss_refuses_settings_that_are_not_finite(kwargs, match):
    """NaN passed the range checks: a NaN loss, an offset silently skipped, an IndexError at the first step."""
    with pytest.raises(ValueError, match=match):
        DiffusionLoss(NoiseSchedule.from_name(), "v_prediction", **kwargs)


def test_a_schedule_refuses_betas_that_are_not_finite():
    with pytest.raises(ValueError, match=r"betas must be finite and lie in \(0, 1\]"):
        NoiseSchedule(torch.tensor([0.1, float("nan")]))


def test_loss_refuses_epsilon_with_zero_terminal_snr():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiffusionLoss(NoiseSchedule.from_name("linear", rescale_betas_zero_snr=True), prediction_type="epsilon")


# ---------------------------------------------------------------- guidance


def test_cfg_matches_diffusers_rescale():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for scale in (1.0, 3.0, 7.5):
        for rescale in (0.0, 0.7):
            ref = uncond + scale * (cond - uncond)
            ref = rescale_noise_cfg(ref, cond, guidance_rescale=rescale)
            torch.testing.assert_close(classifier_free_guidance(uncond, cond, scale, rescale), ref)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(uncond, cond, 0.0), uncond)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        classifier_free_guidance(uncond, cond, -1.0)


def test_cfg_object_batches_uncond_and_cond_in_one_call_and_respects_its_interval():
    calls = []

    def denoise(x, t, ctx):
        calls.append((x.shape[0], int(t[0])))
        return x * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x, t = torch.ones(3, 2, 4, 4), torch.tensor([5, 5, 5])
    cond, uncond = torch.full((3, 7, 16), 2.0), torch.zeros(3, 7, 16)
    out = ClassifierFreeGuidance(4.0, uncond)(denoise, x, t, cond)
    assert calls == [(6, 5)]
    torch.testing.assert_close(out, x * 8.0)  # 0 + 4 * (2 - 0)
    ClassifierFreeGuidance(1.0)(denoise, x, t, cond)  # scale 1: the conditional half alone
    assert calls[-1] == (3, 5)
    outside = ClassifierFreeGuidance(4.0, uncond, interval=(400, 1000))
    torch.testing.assert_close(outside(denoise, x, t, cond), x * 2.0)  # t=5 is outside [400, 1000]: unguided
    assert calls[-1] == (3, 5) and outside.guides_at(400) and not outside.guides_at(399)
    with pytest.raises(ValueError, match="needs the unconditional context"):
        ClassifierFreeGuidance(3.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        ClassifierFreeGuidance(float("nan"), uncond)
    with pytest.raises(ValueError, match="0 <= lo <= hi"):
        ClassifierFreeGuidance(2.0, uncond, interval=(600, 400))


def test_autoguidance_object_adds_the_guide_term_to_cfg():
    def denoise(x, t, ctx):
        return x * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def guide(x, t, ctx):
        return x * 0.5

    x, t = torch.ones(2, 1, 2, 2), torch.tensor([7, 7])
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.zeros(2, 3, 4)
    cfg = ClassifierFreeGuidance(3.0, uncond)
    out = AutoGuidance(guide, 2.0, cfg=cfg)(denoise, x, t, cond)
    torch.testing.assert_close(out, x * (6.0 + (2.0 - 1.0) * (2.0 - 0.5)))  # CFG 0 + 3 (2 - 0), plus (s-1)(c-g)
    torch.testing.assert_close(AutoGuidance(guide, 1.0, cfg=cfg)(denoise, x, t, cond), x * 6.0)
    with pytest.raises(ValueError, match="autoguidance_scale must be a finite number >= 1"):
        AutoGuidance(guide, 0.5)


# ---------------------------------------------------------------- timestep embedding


@pytest.mark.parametrize("dim", [32, 320, 33])
def test_timestep_embedding_matches_sd_convention(dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, dim), ref)
    assert timestep_embedding(t, dim)[0, : dim // 2].eq(1).all()  # cos(0) first, as in the SD UNet


def test_guidance_rescale_leaves_a_constant_output_as_it_is():
    """A constant guided output (a zero-initialised UNet's) has std 0: the rescale divided by it and gave NaN for
    that sample only. It is left unrescaled; the other samples are rescaled as before."""
    torch.manual_seed(0)
    uncond, cond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    uncond[1], cond[1] = 0.5, 0.5  # sample 1: a constant output
    out = classifier_free_guidance(uncond, cond, 5.0, 0.7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], torch.full_like(out[1], 0.5))
    torch.testing.assert_close(out[:1], classifier_free_guidance(uncond[:1], cond[:1], 5.0, 0.7))


def test_autoguidance_at_scale_one_needs_no_guide():
    """Scale 1 disables autoguidance (its docstring): building it without a guide there is no error."""
    guidance = AutoGuidance(None, 1.0)
    assert guidance.scale == 1.0
    with pytest.raises(ValueError, match="needs a guide model"):
        AutoGuidance(None, 2.0)
