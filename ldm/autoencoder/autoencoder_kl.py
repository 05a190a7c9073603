"""The KL-regularised autoencoder (SD's ``first_stage_model``) and the latent normalisation used by diffusion."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.autoencoder.modules import Decoder, Encoder


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` every ``stride`` covering [0, size), the last one flush at the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool, like: torch.Tensor) -> torch.Tensor:
    """1-d blending weights: 1 inside, linear ramps over ``overlap`` samples at sides shared with a neighbour."""
    w = torch.ones(length, device=like.device, dtype=torch.float32)
    n = min(overlap, length)
    if n > 0:
        ramp = (torch.arange(n, device=like.device, dtype=torch.float32) + 1) / (n + 1)
        if ramp_start:
            w[:n] = torch.minimum(w[:n], ramp)
        if ramp_end:
            w[length - n:] = torch.minimum(w[length - n:], ramp.flip(0))
    return w

SD_LATENT_SCALE = 0.18215  # Stable Diffusion 1.x / 2.x: the one place this constant is written


def downsample_factor(ch_mult: Sequence[int]) -> int:
    """How many image pixels one latent pixel spans per side: each level after the first halves the size."""
    return 2 ** (len(ch_mult) - 1)


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode(x)`` -> DiagonalGaussianDistribution, ``decode(z)`` -> image (nominally [-1, 1]).

    The latent normalisation that diffusion trains in is declared here once: ``z_model = (z - shift) * scale``
    where ``shift`` is ``shift_factor`` (scalar) or ``latent_mean`` (per channel) and ``scale`` is ``scale_factor``,
    divided per channel by ``latent_std`` when given. ``encode_latents`` / ``decode_latents`` apply and undo it.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int = 4,
        dropout: float = 0.0,
        scale_factor: float = SD_LATENT_SCALE,
        shift_factor: float | None = None,
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if any(isinstance(m, bool) or not float(m).is_integer() or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must hold integers >= 1 (each level's width is ch times its entry), got "
                             f"{list(ch_mult)}")
        ch_mult = tuple(int(m) for m in ch_mult)
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks, z_channels=z_channels, embed_dim=embed_dim, dropout=dropout,
        )  # fmt: skip
        self.embed_dim = embed_dim
        self.downsample_factor = downsample_factor(ch_mult)
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout)
        self.decoder = Decoder(out_channels, ch, ch_mult, num_res_blocks, z_channels, dropout)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        # non-persistent: they follow .to(device) but stay out of the SD-layout state dict
        self.register_buffer("latent_shift", torch.zeros(1, embed_dim, 1, 1), persistent=False)
        self.register_buffer("latent_scale", torch.ones(1, embed_dim, 1, 1), persistent=False)
        self.set_latent_normalization(scale_factor, shift_factor, latent_mean, latent_std)

    def set_latent_normalization(self, scale_factor: float, shift_factor: float | None = None,
                                 latent_mean: Sequence[float] | None = None,
                                 latent_std: Sequence[float] | None = None) -> None:
        """Set the latent normalisation (the class docstring's shift and scale) in ``config`` and the buffers, as the
        constructor and a fit after the VAE's training do."""
        if shift_factor is not None and latent_mean is not None:
            raise ValueError("give shift_factor (scalar) or latent_mean (per channel), not both")
        for name, values in (("latent_mean", latent_mean), ("latent_std", latent_std)):
            if values is not None and len(values) != self.embed_dim:
                raise ValueError(f"{name} needs one value per latent channel ({self.embed_dim}), got {len(values)}")
        if latent_std is not None and not all(0 < float(v) < math.inf for v in latent_std):
            raise ValueError(f"latent_std must be positive and finite, got {list(latent_std)}")
        if not 0 < float(scale_factor) < math.inf:
            raise ValueError(f"scale_factor must be a finite number > 0 (decoding divides the latents by it), got "
                             f"{scale_factor}")
        if shift_factor is not None and not math.isfinite(float(shift_factor)):
            raise ValueError(f"shift_factor must be finite, got {shift_factor}")
        if latent_mean is not None and not all(math.isfinite(float(v)) for v in latent_mean):
            raise ValueError(f"latent_mean must be finite, got {list(latent_mean)}")
        self.config.update(
            scale_factor=float(scale_factor), shift_factor=None if shift_factor is None else float(shift_factor),
            latent_mean=None if latent_mean is None else [float(v) for v in latent_mean],
            latent_std=None if latent_std is None else [float(v) for v in latent_std],
        )
        shift = torch.zeros(self.embed_dim)
        if shift_factor is not None:
            shift.fill_(float(shift_factor))
        if latent_mean is not None:
            shift = torch.tensor(self.config["latent_mean"])
        scale = torch.full((self.embed_dim,), float(scale_factor))
        if latent_std is not None:
            scale = scale / torch.tensor(self.config["latent_std"])
        self.latent_shift.copy_(shift.view(1, -1, 1, 1))
        self.latent_scale.copy_(scale.view(1, -1, 1, 1))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image [B, C, H, W] in [-1, 1] -> posterior over latents [B, embed_dim, H/f, W/f]."""
        if x.ndim != 4 or x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"encode expects [B, C, H, W] with H, W multiples of {self.downsample_factor}, got "
                             f"{tuple(x.shape)}")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 8) -> torch.Tensor:
        """Latents [B, embed_dim, h, w] -> images; with ``tile_size`` (latent pixels) decode overlapping tiles and
        blend them linearly over ``tile_overlap`` latent pixels, bounding memory for large images."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"decode expects latents [B, {self.embed_dim}, h, w], got {tuple(z.shape)}")
        z = self.post_quant_conv(z)
        h, w = z.shape[-2:]
        if tile_size is None or (h <= tile_size and w <= tile_size):
            return self.decoder(z)
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size={tile_size}), got {tile_overlap}")
        f = self.downsample_factor
        stride = tile_size - tile_overlap
        out = weight = None
        for y0 in _tile_starts(h, tile_size, stride):
            for x0 in _tile_starts(w, tile_size, stride):
                th, tw = min(tile_size, h), min(tile_size, w)
                tile = self.decoder(z[..., y0:y0 + th, x0:x0 + tw])
                if out is None:
                    out = torch.zeros(*tile.shape[:2], h * f, w * f, device=tile.device, dtype=torch.float32)
                    weight = torch.zeros(1, 1, h * f, w * f, device=tile.device, dtype=torch.float32)
                wy = _ramp(th * f, tile_overlap * f, y0 > 0, y0 + th < h, tile)
                wx = _ramp(tw * f, tile_overlap * f, x0 > 0, x0 + tw < w, tile)
                wt = wy[:, None] * wx[None, :]
                out[..., y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += tile.float() * wt
                weight[..., y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += wt
        assert out is not None and weight is not None
        return (out / weight).to(z.dtype)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the normalised latents diffusion works in."""
        return (z - self.latent_shift.to(z.dtype)) * self.latent_scale.to(z.dtype)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw VAE latents (inverse of ``normalize_latents``)."""
        return z / self.latent_scale.to(z.dtype) + self.latent_shift.to(z.dtype)

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image -> sampled, normalised latents for diffusion training. The image is taken in the weights' dtype: a
        wrapper may hand it over in another (FSDP casts a bf16-mixed module's inputs to bf16, and a frozen VAE that
        FSDP leaves unsharded keeps float32 weights)."""
        return self.normalize_latents(self.encode(x.to(next(self.parameters()).dtype)).sample(generator))

    def decode_latents(self, z: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 8) -> torch.Tensor:
        """Normalised latents -> images clamped to [-1, 1]; decoded without autocast (fp16 VAE decodes overflow)."""
        dtype = next(self.parameters()).dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            image = self.decode(self.denormalize_latents(z.to(dtype)), tile_size, tile_overlap)
        return image.clamp(-1.0, 1.0)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x`` through a posterior sample (or its mode): returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
