"""The conditional UNet of latent diffusion, with the module layout of the original Stable Diffusion checkpoints
(``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``, ``label_emb``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.attention import BACKENDS, SpatialTransformer
from ldm.nn.embeddings import timestep_embedding
from ldm.nn.norm import group_norm
from ldm.unet.blocks import Downsample, ResBlock, TimestepEmbedSequential, Upsample


class UNet(nn.Module):
    """Conditional UNet eps/v/x0 predictor: ``forward(x, t, context, y=None)`` -> tensor shaped like ``x``.

    ``attention_resolutions`` lists the downsample factors (1 = input resolution, 2 = after one downsample, ...)
    whose levels get a SpatialTransformer after each ResBlock, as SD's ``[4, 2, 1]``. Heads are given either as a
    count (``num_heads``, SD1) or as a width per head (``num_head_channels``, SD2); the other stays -1.
    ``pool_context`` adds an MLP of the context's mean token to the timestep embedding (pooled text conditioning, as
    in Imagen): every ResBlock then sees the caption, not only the blocks with cross-attention.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_heads: int = -1,
        num_head_channels: int = -1,
        context_dim: int | None = 768,
        use_linear_proj: bool = False,
        transformer_depth: int = 1,
        dropout: float = 0.0,
        num_classes: int | None = None,
        use_scale_shift_norm: bool = False,
        gradient_checkpointing: bool = False,
        attention_backend: str = "sdpa",
        pool_context: bool = False,
    ) -> None:
        super().__init__()
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"give exactly one of num_heads (SD1 style) or num_head_channels (SD2 style); got num_heads={num_heads}"
                f", num_head_channels={num_head_channels}"
            )
        if attention_backend not in BACKENDS:
            raise ValueError(
                f"unknown attention backend {attention_backend!r}; allowed values are {', '.join(BACKENDS)}"
            )
        if pool_context and context_dim is None:
            raise ValueError("pool_context=true pools the text context, but context_dim is None (an unconditional "
                             "UNet): set context_dim or pool_context=false")
        if any(isinstance(m, bool) or not float(m).is_integer() or m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must hold integers >= 1 (each level's width is model_channels times its "
                             f"entry), got {list(channel_mult)}")
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if isinstance(transformer_depth, bool) or not isinstance(transformer_depth, int) or transformer_depth < 1:
            raise ValueError(f"transformer_depth must be an integer >= 1 (transformer blocks per attention level), got "
                             f"{transformer_depth!r}; for a UNet without attention set attention_resolutions=[]")
        factors = [2 ** level for level in range(len(channel_mult))]
        unreached = [r for r in attention_resolutions if r not in factors]
        if unreached:  # such an entry would add no attention anywhere
            raise ValueError(f"attention_resolutions are downsample factors, one of {factors} for {len(channel_mult)} "
                             f"levels (channel_mult); {unreached} is reached by no level. Use e.g. {factors[1:]} for "
                             "attention below the first level (guided-diffusion's 32/16/8 are resolutions, not "
                             "factors)")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), num_heads=num_heads,
            num_head_channels=num_head_channels, context_dim=context_dim, use_linear_proj=use_linear_proj,
            transformer_depth=transformer_depth, dropout=dropout, num_classes=num_classes,
            use_scale_shift_norm=use_scale_shift_norm, gradient_checkpointing=gradient_checkpointing,
            attention_backend=attention_backend, pool_context=pool_context,
        )  # fmt: skip
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.context_dim, self.num_classes = context_dim, num_classes
        self.num_levels = len(channel_mult)
        self.gradient_checkpointing = gradient_checkpointing
        emb_dim = model_channels * 4

        def transformer(ch: int) -> SpatialTransformer:
            if num_head_channels == -1:
                if not 1 <= num_heads <= ch:
                    raise ValueError(f"num_heads={num_heads} cannot split an attention level of {ch} channels: give "
                                     "from 1 head to that width (a divisor of it), or num_head_channels")
                heads, d_head = num_heads, ch // num_heads
            else:
                if num_head_channels < 1 or num_head_channels > ch:
                    raise ValueError(f"num_head_channels={num_head_channels} leaves a level of {ch} channels without a "
                                     "head: give at most the narrowest attention level's width, or -1 with num_heads")
                heads, d_head = ch // num_head_channels, num_head_channels
            # no dropout inside the attention blocks: the original UNets (DDPM, ADM, SD) and diffusers drop out in
            # the residual blocks only
            return SpatialTransformer(ch, heads, d_head, transformer_depth, 0.0, context_dim, use_linear_proj,
                                      attention_backend)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        self.context_emb = (nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                            if pool_context else None)

        conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, dropout, mult * model_channels, use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
            transformer(ch),
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                skip = skip_chans.pop()
                layers = [ResBlock(ch + skip, emb_dim, dropout, mult * model_channels, use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None,
                      concat: torch.Tensor | None = None) -> None:
        """Raise ValueError with an actionable message when the inputs cannot run through this UNet."""
        if concat is not None:
            if concat.ndim != 4 or concat.shape[0] != x.shape[0] or concat.shape[-2:] != x.shape[-2:] or \
                    x.shape[1] + concat.shape[1] != self.in_channels:
                raise ValueError(f"concat must be [B, {self.in_channels} - x channels, H, W] like x "
                                 f"{tuple(x.shape)} (in_channels={self.in_channels}), got {tuple(concat.shape)}")
        elif x.ndim != 4 or x.shape[1] != self.in_channels:
            hint = (" (an inpainting UNet: pass the mask and masked-image latents as concat)"
                    if x.ndim == 4 and x.shape[1] < self.in_channels else "")
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}{hint}")
        if self.context_dim is not None:
            if context is None:
                raise ValueError(f"this UNet is conditioned (context_dim={self.context_dim}): pass context [B, L, "
                                 f"{self.context_dim}]")
            if context.ndim != 3 or context.shape[-1] != self.context_dim:
                raise ValueError(f"context must be [B, L, {self.context_dim}] (context_dim={self.context_dim}), got "
                                 f"{tuple(context.shape)}")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context batch {context.shape[0]} does not match x batch {x.shape[0]}")
        if self.num_classes is not None and y is None:
            raise ValueError(f"this UNet is class-conditional (num_classes={self.num_classes}): pass labels y [B]")
        if self.num_classes is None and y is not None:
            raise ValueError("labels y were given but this UNet has num_classes=None")

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
             upsample_size: torch.Size | None = None) -> torch.Tensor:
        """Run one block, through activation checkpointing when enabled and gradients are being recorded."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, upsample_size, use_reentrant=False)
        return block(h, emb, context, upsample_size)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        contexts_per_input: int = 1,
    ) -> torch.Tensor:
        """Predict from noisy latents ``x`` [B, C, H, W] at timesteps ``t`` ([B] or scalar), context [B, L, D].

        ``concat`` holds extra input channels joined after ``x`` (an inpainting UNet's mask and masked-image latents,
        diffusers' order), so samplers and losses keep handling ``x`` alone.

        ``contexts_per_input=k`` denoises each input under k contexts: ``context`` is [k*B, L, D], k groups of B
        (classifier-free guidance's [uncond; cond]), and the output [k*B, C, H, W] is the k groups' outputs in turn,
        as if ``x``, ``t``, ``y`` and ``concat`` had been repeated k times. The layers before the first
        cross-attention, which do not see the context, then run once for the k groups (with ``pool_context`` every
        layer sees it, and the inputs are repeated)."""
        steps = torch.as_tensor(t)
        if steps.ndim > 1 or (steps.ndim == 1 and steps.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"t must be a scalar or hold one timestep per input ({x.shape[0]}), got shape "
                             f"{tuple(steps.shape)}")
        if contexts_per_input != 1 or type(contexts_per_input) is not int:
            x, t, y, concat, context = self._grouped_inputs(x, t, y, concat, context, contexts_per_input)
        grouped = contexts_per_input != 1 and self.context_emb is None  # checked: k groups of the x batch
        self._check_inputs(x, context[:x.shape[0]] if grouped else context, y, concat)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        if self.context_emb is not None:
            emb = emb + self.context_emb(context.mean(dim=1).to(emb.dtype))
        h = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            # an upsampling block meets the next skip's size: an odd size halved rounds up, doubled it is one more
            h = self._run(block, self._join(h, skips.pop()), emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    @staticmethod
    def _join(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``h`` and a skip connection along the channels; a skip from before the first cross-attention (one row
        per input) joins each of ``h``'s context groups, in one copy."""
        if skip.shape[0] == h.shape[0]:
            return torch.cat([h, skip], dim=1)
        k = h.shape[0] // skip.shape[0]
        return torch.cat([h.unflatten(0, (k, -1)), skip.expand(k, *skip.shape)], dim=2).flatten(0, 1)

    def _grouped_inputs(self, x: torch.Tensor, t: torch.Tensor | float | int, y: torch.Tensor | None,
                        concat: torch.Tensor | None, context: torch.Tensor | None, k: int) -> tuple:
        """Check ``contexts_per_input`` (k) against the inputs; with ``pool_context`` (the embedding sees the
        context) the inputs come back repeated k times, otherwise as they are."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"contexts_per_input must be an integer >= 1, got {k!r}")
        if self.context_dim is None:
            raise ValueError(f"contexts_per_input={k} pairs each input with k contexts, but this UNet is "
                             "unconditional (context_dim=None): pass contexts_per_input=1")
        if context is None or context.ndim != 3 or context.shape[0] != k * x.shape[0]:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"contexts_per_input={k} needs a context of {k} x {x.shape[0]} rows (k groups of the "
                             f"x batch, e.g. [uncond; cond]), got {got}")
        if self.context_emb is None:
            return x, t, y, concat, context
        t = torch.as_tensor(t, device=x.device)
        if t.ndim:
            t = t.repeat(k)
        return (x.repeat(k, 1, 1, 1), t, None if y is None else y.repeat(k),
                None if concat is None else concat.repeat(k, 1, 1, 1), context)
