"""UNet building blocks in the original Stable Diffusion layout: ResBlock, Downsample, Upsample and the
TimestepEmbedSequential container that routes the time embedding and the context to the layers that take them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.attention import SpatialTransformer
from ldm.nn.norm import group_norm


class ResBlock(nn.Module):
    """Residual conv block conditioned on the time embedding (added, or as scale/shift of the second norm)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # starts as the identity (plus skip), as in SD
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], emb [B, emb_channels] -> [B, out_channels, H, W]."""
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (``op``)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C', H/2, W/2]."""
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, C', 2H, 2W], or to ``size`` (the skip connection's (H', W') after an odd size was
        halved, as diffusers' ``upsample_size``); the interpolation runs in float32 for bfloat16 inputs
        (unsupported)."""
        dtype = x.dtype
        if dtype == torch.bfloat16:
            x = x.float()
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x.to(dtype))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that passes the time embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                upsample_size: Sequence[int] | None = None) -> torch.Tensor:
        """Run the layers in order, each with the inputs it takes (an Upsample: ``upsample_size``). Past a
        SpatialTransformer that paired each input with k contexts (``ldm.nn.attention.context_groups``), the
        embedding is repeated for the k groups too."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb if emb.shape[0] == x.shape[0] else emb.repeat(x.shape[0] // emb.shape[0], 1))
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x
