"""Normalisation layers shared by the UNet and the VAE."""

from __future__ import annotations

import torch
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so half-precision activations keep their statistics exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` in float32 and return it in its own dtype."""
        return super().forward(x.float()).to(x.dtype)


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> GroupNorm32:
    """A 32-group float32 GroupNorm over ``channels``, the SD default."""
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels divisible by {groups} groups, got {channels} channels")
    return GroupNorm32(groups, channels, eps=eps)
