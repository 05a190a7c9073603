"""Sinusoidal timestep embeddings in the Stable Diffusion convention (cosine half first)."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed timesteps ``t`` [B] (int or float) as [B, dim] features: cat(cos(t f), sin(t f)).

    Frequencies are f_i = max_period ** (-i / (dim // 2)), i < dim // 2, as in the original SD UNet
    (diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True, downscale_freq_shift=0``). An odd ``dim``
    gets a zero column at the end. Computed in float32 whatever the input dtype.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-d tensor [B], got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
