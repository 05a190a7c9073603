"""The flow-matching objective: its noise-level densities and loss weights equal diffusers' SD3 training utilities,
its interpolation and target are rectified flow's, and the shift is SD3's (fixed or resolution-dependent)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ldm.diffusion.flow import (
    FlowMatchingLoss,
    flow_loss_weights,
    latent_tokens,
    resolution_shift,
    sample_noise_levels,
    shift_sigmas,
)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_noise_level_densities_equal_diffusers_for_the_same_generator(sampling: str) -> None:
    ours = sample_noise_levels(4096, sampling, 0.3, 1.2, 1.29, torch.Generator().manual_seed(5))
    theirs = compute_density_for_timestep_sampling(sampling if sampling != "uniform" else "none", 4096, 0.3, 1.2,
                                                   1.29, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert 0 <= float(ours.min()) and float(ours.max()) <= 1


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_equal_diffusers(weighting: str) -> None:
    sigma = torch.linspace(0.02, 0.98, 49)
    torch.testing.assert_close(flow_loss_weights(sigma, weighting), compute_loss_weighting_for_sd3(weighting, sigma))


def test_sigma_sqrt_weights_a_level_of_zero_as_the_smallest_table_level() -> None:
    """torch.rand draws 0 (about once in 2^24 draws): 1 / sigma^2 would make the loss infinite. Levels under 1 / T,
    the smallest of diffusers' T-step table, weigh as that one; above it the weights are diffusers'."""
    loss = FlowMatchingLoss(num_train_timesteps=1000, timestep_sampling="uniform", weighting="sigma_sqrt")
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.0, 1e-5, 0.5])
    value = loss(lambda x, t, c: torch.zeros_like(x), x0, sigma=sigma, noise=torch.randn_like(x0))
    assert math.isfinite(float(value))
    weights = flow_loss_weights(sigma, "sigma_sqrt", min_sigma=1e-3)
    torch.testing.assert_close(weights, torch.tensor([1e6, 1e6, 4.0]))


def test_the_shift_moves_levels_toward_noise_and_matches_sd3_at_the_reference_points() -> None:
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_sigmas(u, 1.0), u)
    s3 = shift_sigmas(u, 3.0)
    assert torch.all(s3 >= u) and float(s3[0]) == 0 and float(s3[-1]) == 1
    assert float(shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    # SD3/Flux: mu = 0.5 at 256 tokens, 1.15 at 4096, linear between; the shift is exp(mu)
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert latent_tokens(torch.zeros(1, 16, 128, 128)) == 4096  # a 1024 px image's latents in 2x2 patches


def test_the_loss_regresses_the_velocity_at_the_interpolated_point_with_the_scaled_timestep() -> None:
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    seen = {}

    def denoise(x_t, t, cond):
        seen.update(x_t=x_t, t=t, cond=cond)
        return torch.zeros_like(x_t)

    loss = FlowMatchingLoss(weighting="none")(denoise, x0, "c", sigma=sigma, noise=noise)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], (1 - s) * x0 + s * noise)
    torch.testing.assert_close(seen["t"], sigma * 1000)  # SD3 feeds the network sigma * num_train_timesteps
    assert seen["cond"] == "c"
    assert float(loss) == pytest.approx(float(((noise - x0) ** 2).mean()), rel=1e-6)
    # the exact velocity gives zero loss
    exact = FlowMatchingLoss()(lambda x_t, t, c: noise - x0, x0, sigma=sigma, noise=noise)
    assert float(exact) == pytest.approx(0.0, abs=1e-12)


def test_drawn_levels_follow_the_configured_density_and_shift() -> None:
    x0 = torch.zeros(20000, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    plain = FlowMatchingLoss(timestep_sampling="logit_normal").sample_sigmas(x0, g)
    shifted = FlowMatchingLoss(timestep_sampling="logit_normal", shift=3.0).sample_sigmas(x0, g)
    assert float(plain.median()) == pytest.approx(0.5, abs=0.02)  # sigmoid(N(0, 1)): centred
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.02)  # the median moves as the shift maps 0.5
    big = FlowMatchingLoss(resolution_shift=True)
    assert big.shift_for(torch.zeros(1, 4, 128, 128)) == pytest.approx(math.exp(1.15))


@pytest.mark.parametrize("kwargs,message", [
    ({"timestep_sampling": "lognorm"}, "unknown timestep_sampling"),
    ({"weighting": "snr"}, "unknown flow loss weighting"),
    ({"shift": 0.0}, "shift must be a finite number > 0"),
    ({"shift": float("nan")}, "shift must be a finite number > 0"),
    ({"logit_std": -1.0}, "logit_std must be"),
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowMatchingLoss(**kwargs)
