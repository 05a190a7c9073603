"""The KL autoencoder, its posterior distribution, latent normalisation and tiled decoding (tiny configs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.autoencoder import AutoencoderKL, DiagonalGaussianDistribution

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)


def _params(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 8, 4, 4, generator=g)


def test_distribution_statistics_match_torch() -> None:
    params = _params()
    dist = DiagonalGaussianDistribution(params)
    mean, logvar = params.chunk(2, dim=1)
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(dist.mean, mean)
    torch.testing.assert_close(dist.std, ref.stddev)
    torch.testing.assert_close(dist.mode(), mean)
    torch.testing.assert_close(dist.kl(), torch.distributions.kl_divergence(ref, std_normal).sum(dim=(1, 2, 3)))
    x = torch.randn_like(mean)
    torch.testing.assert_close(dist.nll(x), -ref.log_prob(x).sum(dim=(1, 2, 3)))
    other = DiagonalGaussianDistribution(_params(1))
    ref_other = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(dist.kl(other), torch.distributions.kl_divergence(ref, ref_other).sum(dim=(1, 2, 3)))
    assert dist.kl().shape == (3,)


def test_distribution_sampling() -> None:
    dist = DiagonalGaussianDistribution(_params())
    a = dist.sample(torch.Generator().manual_seed(5))
    b = dist.sample(torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.shape == dist.mean.shape
    zero = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    torch.testing.assert_close(zero.kl(), torch.zeros(2))
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def test_logvar_is_clamped() -> None:
    params = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    assert torch.isfinite(DiagonalGaussianDistribution(params).kl()).all()


def test_autoencoder_shapes_and_sd_names() -> None:
    vae = AutoencoderKL(**TINY)
    x = torch.randn(2, 3, 16, 16)
    recon, posterior = vae(x)
    assert recon.shape == x.shape and posterior.mean.shape == (2, 4, 8, 8)
    recon_mode, _ = vae(x, sample_posterior=False)
    torch.testing.assert_close(recon_mode, vae.decode(posterior.mode()))
    keys = set(vae.state_dict())
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_1.conv1.weight",
              "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight", "encoder.mid.attn_1.norm.weight",
              "encoder.mid.block_2.conv2.weight", "encoder.norm_out.weight", "encoder.conv_out.weight",
              "decoder.up.1.block.1.conv1.weight", "decoder.up.1.upsample.conv.weight",
              "decoder.up.0.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.weight"]:
        assert k in keys, k
    assert vae.state_dict()["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in keys


def test_gradient_flows_to_all_parameters() -> None:
    vae = AutoencoderKL(**TINY)
    recon, posterior = vae(torch.randn(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    (recon.square().mean() + posterior.kl().mean()).backward()
    dead = [n for n, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_latent_normalisation_round_trip() -> None:
    vae = AutoencoderKL(**TINY, scale_factor=0.5, latent_mean=[0.1, 0.2, 0.3, 0.4], latent_std=[1.0, 2.0, 3.0, 4.0])
    z = torch.randn(2, 4, 8, 8)
    zn = vae.normalize_latents(z)
    torch.testing.assert_close(zn[:, 1], (z[:, 1] - 0.2) * 0.5 / 2.0)
    torch.testing.assert_close(vae.denormalize_latents(zn), z)
    shifted = AutoencoderKL(**TINY, scale_factor=2.0, shift_factor=0.25)
    torch.testing.assert_close(shifted.normalize_latents(z), (z - 0.25) * 2.0)
    with pytest.raises(ValueError, match="not both"):
        AutoencoderKL(**TINY, shift_factor=0.1, latent_mean=[0.0] * 4)
    with pytest.raises(ValueError, match="one value per latent channel"):
        AutoencoderKL(**TINY, latent_std=[1.0, 2.0])
    with pytest.raises(ValueError, match="latent_std must be positive"):
        AutoencoderKL(**TINY, latent_std=[1.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("normalization", [
    {"scale_factor": 0.0}, {"scale_factor": -0.5}, {"scale_factor": math.inf}, {"scale_factor": math.nan},
    {"shift_factor": math.inf}, {"latent_mean": [0.0, 0.0, 0.0, math.nan]},
    {"latent_std": [1.0, 1.0, 1.0, math.nan]}, {"latent_std": [1.0, 1.0, 1.0, math.inf]}])
def test_a_latent_normalisation_that_cannot_be_undone_is_refused(normalization) -> None:
    """A zero or non-finite scale, or a non-finite shift, mean or std, was taken: latents normalised to zeros (the
    diffusion model then trains on nothing) or NaN, and the pipeline blamed the sampling settings."""
    name = next(iter(normalization))
    with pytest.raises(ValueError, match=name):
        AutoencoderKL(**TINY, **normalization)
    vae = AutoencoderKL(**TINY, scale_factor=0.5)
    with pytest.raises(ValueError, match=name):
        vae.set_latent_normalization(**{"scale_factor": 1.0, **normalization})
    assert vae.config["scale_factor"] == 0.5 and torch.all(vae.latent_scale == 0.5)


def test_setting_the_latent_normalisation_replaces_config_and_buffers() -> None:
    vae = AutoencoderKL(**TINY, scale_factor=0.5)
    z = torch.randn(2, 4, 8, 8)
    vae.set_latent_normalization(2.0, latent_mean=[0.1, 0.2, 0.3, 0.4], latent_std=[1.0, 2.0, 4.0, 8.0])
    assert vae.config["scale_factor"] == 2.0 and vae.config["latent_std"] == [1.0, 2.0, 4.0, 8.0]
    torch.testing.assert_close(vae.normalize_latents(z)[:, 2], (z[:, 2] - 0.3) * 2.0 / 4.0)
    rebuilt = AutoencoderKL(**{**TINY, **{k: vae.config[k] for k in ("scale_factor", "latent_mean", "latent_std")}})
    torch.testing.assert_close(rebuilt.normalize_latents(z), vae.normalize_latents(z))
    vae.set_latent_normalization(0.25, shift_factor=1.0)  # back to scalar: the per-channel entries go
    assert vae.config["latent_mean"] is None and vae.config["latent_std"] is None
    torch.testing.assert_close(vae.normalize_latents(z), (z - 1.0) * 0.25)


def test_encode_and_decode_latents() -> None:
    vae = AutoencoderKL(**TINY)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(3)
    z = vae.encode_latents(x, g)
    posterior = vae.encode(x)
    expected = posterior.sample(torch.Generator().manual_seed(3)) * 0.18215
    torch.testing.assert_close(z, expected)
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(5.0)  # push outputs out of range
    img = vae.decode_latents(z)
    assert img.shape == (1, 3, 16, 16) and img.max() <= 1.0 and img.min() >= -1.0
    torch.testing.assert_close(img, vae.decode(z / 0.18215).clamp(-1, 1))


def test_tiled_decode() -> None:
    vae = AutoencoderKL(**TINY)
    z = torch.randn(1, 4, 12, 10)
    with torch.no_grad():
        plain = vae.decode(z)
        torch.testing.assert_close(vae.decode(z, tile_size=16), plain)  # one tile covers all
        tiled = vae.decode(z, tile_size=6, tile_overlap=2)
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()

    class Local(torch.nn.Module):
        """A per-pixel stand-in decoder: tiling must then reproduce the untiled result exactly."""

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return F.interpolate(h[:, :3], scale_factor=2.0, mode="nearest")

    vae.decoder = Local()
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z, tile_size=5, tile_overlap=2), vae.decode(z))
        torch.testing.assert_close(vae.decode(z, tile_size=4, tile_overlap=0), vae.decode(z))
    with pytest.raises(ValueError, match="tile_overlap"):
        vae.decode(z, tile_size=4, tile_overlap=4)


def test_input_errors() -> None:
    vae = AutoencoderKL(**TINY)
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.randn(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"latents \[B, 4, h, w\]"):
        vae.decode(torch.randn(1, 3, 8, 8))


def test_attention_block_under_cpu_bf16_autocast_matches_float32() -> None:
    """The VAE's attention block passes q, k and v as transposed views; under CPU bf16 autocast (bf16-mixed) its
    output and input gradient stay within bf16 rounding of the float32 block's."""
    from ldm.autoencoder.modules import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(64)
    x = torch.randn(4, 64, 8, 8, requires_grad=True)
    ref = block(x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    (g,) = torch.autograd.grad(out.float().square().sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert (out.float() - ref).norm() < 1e-2 * ref.norm()
    assert (g - gref).norm() < 2e-2 * gref.norm()
