"""Normalisation layers shared by the UNet and the VAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so half-precision activations keep their statistics exact.

    The affine weights are taken in float32 too: under FSDP's ``param_dtype`` (or ``bf16-true``) they are bfloat16,
    and outside CUDA autocast a float32 input with bfloat16 weights is an error.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` in float32 and return it in its own dtype."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # torch's CPU kernel takes bf16 activations with float32 weights and computes in float32 itself: the same
            # result without a float32 copy of x (kept for the backward) and a cast of the output. On channels-last
            # memory (a model moved to channels-last) that kernel is many times slower than on contiguous memory at the
            # UNet's sizes, so x is made contiguous first (docs/performance.md)
            return F.group_norm(x.contiguous(), self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> GroupNorm32:
    """A 32-group float32 GroupNorm over ``channels``, the SD default."""
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels divisible by {groups} groups, got {channels} channels")
    return GroupNorm32(groups, channels, eps=eps)
