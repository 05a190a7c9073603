"""Attention with switchable back ends (sdpa | xformers | math) and the SD transformer blocks built on it.

Module and parameter names follow the original Stable Diffusion layout (``to_q``, ``to_out.0``, ``ff.net.0.proj``,
``transformer_blocks``...) so that checkpoints load without renaming.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.norm import group_norm

BACKENDS = ("auto", "sdpa", "xformers", "math")


def xformers_available() -> bool:
    """True when the xformers package can be imported (checked without importing it)."""
    return importlib.util.find_spec("xformers") is not None


@functools.cache
def xformers_kernel_problem() -> str | None:
    """None when xformers' compiled kernels loaded; else why not. A wheel built for another torch or CUDA imports
    fine but has no kernels (xformers 0.0.35, built for torch 2.10+cu128, under torch 2.11+cu130 on an H200)."""
    import xformers  # noqa: PLC0415  (optional dependency)

    if getattr(xformers, "_has_cpp_library", True):
        return None
    return (f"xformers {getattr(xformers, '__version__', '?')} is installed but its compiled kernels did not load "
            f"(it was built for another torch or CUDA than torch {torch.__version__}; `python -m xformers.info` "
            "says which)")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested back end into the one that will run on ``device``; raise ValueError when it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed values are {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cuda" or not xformers_available():
            return "sdpa"
        problem = xformers_kernel_problem()
        if problem is not None:  # auto may fall back, but says so (once: the answer is cached)
            _warn_once(f"attention backend 'auto' uses sdpa: {problem}")
            return "sdpa"
        return "xformers"
    if backend == "xformers":
        if not xformers_available():
            raise ValueError(
                "attention backend 'xformers' requested but xformers is not installed; "
                "install it with `pip install ldm[xformers]` (or `pip install xformers`), or use backend='sdpa'"
            )
        if device.type != "cuda":
            raise ValueError(
                f"attention backend 'xformers' needs CUDA tensors, got tensors on {device.type!r}; "
                "move the model to a CUDA device or use backend='sdpa'"
            )
        problem = xformers_kernel_problem()
        if problem is not None:
            raise ValueError(f"attention backend 'xformers' cannot run: {problem}; install the xformers build that "
                             "matches your torch, or use backend='sdpa'")
    return backend


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference attention: logits and softmax in float32 (even under autocast), probabilities cast to v's dtype."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        scale = 1.0 / math.sqrt(q.shape[-1])
        # scaled after the product, in place: the backward then keeps q itself, not a scaled copy
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
        dead = None
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.float()
            # a query whose keys are all masked attends to nothing (SDPA's zeros, not NaN); its scores are cleared
            # before the softmax too, whose backward would give NaN gradients on a row of -inf
            dead = ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1, True)
            scores = scores.masked_fill(dead, 0.0)
        probs = scores.softmax(dim=-1)
        if dead is not None:
            probs = probs.masked_fill(dead, 0.0)
        return torch.matmul(probs.to(v.dtype), v)


def _records_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will record an op on ``tensors`` (a backward will follow)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _float32_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 with unit stride along its last dimension, as the CPU flash kernel reads it (SDPA checks
    this before choosing that kernel; called directly, the kernel reads a transposed view wrong)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


class _Float32FlashAttention(torch.autograd.Function):
    """torch's CPU flash attention run in float32 on half-precision q, k and v, which are what it keeps for the
    backward, with its half-precision output: through autograd, the float32 copies would be kept instead, twice the
    memory of what torch's own half-precision kernel keeps. The backward upcasts them again and runs the float32
    kernel's backward. The ops are torch's private pair behind ``F.scaled_dot_product_attention`` on the CPU."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(device_type="cpu", enabled=False):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _float32_rows(q), _float32_rows(k), _float32_rows(v), attn_mask=bias
            )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse, bias = ctx.saved_tensors
        with torch.autocast(device_type="cpu", enabled=False):
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _float32_rows(grad), _float32_rows(q), _float32_rows(k), _float32_rows(v), _float32_rows(out), lse,
                0.0, False, attn_mask=bias,
            )
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None


def _flash_kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The shapes torch's CPU flash kernel accepts (SDPA runs its math path on others): one head size, the same
    batch and heads in q, k and v (no broadcasting), and no empty sequence."""
    return (q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[2] == v.shape[2] and min(q.shape[2], k.shape[2]) > 0)


def _float32_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of half-precision CPU tensors that need gradients, computed in float32 and cast back: torch's CPU
    flash-attention kernel runs its bf16 and fp16 backward slower than its float32 one (docs/performance.md).
    Without gradients the half-precision forward is the faster one, and it is used."""
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    # autograd through the casts (it keeps the float32 copies) where the kernel pair cannot: other shapes, a mask
    # that is not 2-d or 4-d (the kernel refuses it), or a learned bias (its backward gives the bias no gradient)
    if not _flash_kernel_takes(q, k, v) or (mask is not None and (mask.ndim not in (2, 4) or mask.requires_grad)):
        with torch.autocast(device_type="cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    bias = mask  # the flash kernel takes an additive float32 bias, into which SDPA turns a boolean mask
    if mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    return _Float32FlashAttention.apply(q, k, v, None if bias is None else _float32_rows(bias))


def dense_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A boolean or additive mask as an additive bias of q's dtype, materialised at [B, heads, Lq, Lk] in storage
    whose rows are padded to a multiple of 8, as xformers' kernels require (they refuse unaligned rows)."""
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    storage = torch.empty(b, h, lq, -(-lk // 8) * 8, dtype=q.dtype, device=q.device)
    return storage[..., :lk].copy_(mask.to(q.dtype).expand(b, h, lq, lk))


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """xformers memory-efficient attention; it wants [B, L, heads, d] and an additive bias."""
    import xformers.ops as xops  # noqa: PLC0415  (optional dependency)

    bias = None if mask is None else dense_bias(mask, q, k)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), attn_bias=bias
    )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Scaled dot-product attention on [B, heads, L, d] tensors through the chosen back end.

    ``mask`` broadcasts to [B, heads, Lq, Lk]: boolean (True = may attend) or additive float. ``backend`` is one of
    ``auto`` (xformers on CUDA when installed with working kernels, else sdpa), ``sdpa`` (torch's fused kernel),
    ``xformers``, ``math`` (explicit float32 softmax, the reference).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, heads, L, d] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    chosen = resolve_backend(backend, q.device)
    if chosen == "sdpa":
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            # an fp32 bias on bf16 queries: the cuDNN kernel that SDPA picks on an H200 (torch 2.11) let masked keys
            # through (the memory-efficient one refuses the mix); in q's dtype every kernel is right (docs/gpu.md)
            mask = mask.to(q.dtype)
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and _records_grad(q, k, v):
            return _float32_sdpa(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if chosen == "math":
        return _math_attention(q, k, v, mask)
    return _xformers_attention(q, k, v, mask)


class CrossAttention(nn.Module):
    """Multi-head attention from ``query_dim`` tokens to ``context_dim`` tokens (self-attention without context)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; allowed values are {', '.join(BACKENDS)}")
        inner = heads * dim_head
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        self.context_dim = context_dim if context_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self._kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, heads*d] -> [B, heads, L, d]."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def _project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, L, heads*d]; the keys and values of a context from the cache when
        ``reuse_context_projections`` holds them. Under torch.compile the cache is not used: keyed by a tensor's
        identity, it would give the compiler one graph for the first step and another for the rest."""
        if context is x:
            return self.to_q(x), self.to_k(x), self.to_v(x)
        cache = None if torch.compiler.is_compiling() or torch.is_grad_enabled() else self._kv_cache
        hit = cache.get(id(context)) if cache is not None else None
        if hit is not None:  # the cache holds the tensor itself, so no other object can have its id meanwhile
            return self.to_q(x), hit[1], hit[2]
        k, v = self.to_k(context), self.to_v(context)
        if cache is not None:
            cache[id(context)] = (context, k, v)
        return self.to_q(x), k, v

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``x`` [B, L, query_dim] to ``context`` [B, Lc, context_dim] (or ``x``); mask [B, Lc] or 4-d."""
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context has feature dimension {context.shape[-1]}, expected context_dim={self.context_dim}"
            )
        q, k, v = (self._split(t) for t in self._project(x, context))
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        out = attention(q, k, v, mask=mask, backend=self.backend)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


@contextmanager
def reuse_context_projections(model: nn.Module) -> Iterator[None]:
    """Within the block, each cross-attention layer of ``model`` computes the keys and values of a context tensor
    once and reuses them while the same tensor object comes back (a sampling loop passes one context at every step);
    only without autograd, and not in a compiled model. The context must not be changed in place inside the block."""
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    for m in layers:
        m._kv_cache = {}
    try:
        yield
    finally:
        for m in layers:
            m._kv_cache = None


def context_groups(context: torch.Tensor | None, batch: int) -> int:
    """How many contexts each of ``batch`` inputs is paired with: 1 for a context of the same batch (or none), k for
    a context of k*``batch`` rows, k groups of ``batch`` in turn (classifier-free guidance's [uncond; cond] for one
    copy of the latents). Any other batch is a ValueError."""
    if context is None or context.shape[0] == batch:
        return 1
    if batch < 1 or context.shape[0] % batch:
        raise ValueError(f"context batch {context.shape[0]} is not a multiple of the input batch {batch}: give one "
                         "context per input, or k contexts per input as k groups of the input batch")
    return context.shape[0] // batch


class GEGLU(nn.Module):
    """Gated GELU projection: one Linear to 2x width, half gates the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return value * gelu(gate)."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The SD transformer MLP: GEGLU to ``mult * dim``, dropout, Linear back (names ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP token-wise."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context, GEGLU MLP, each with a residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout, backend)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, backend)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, dim], context [B, Lc, context_dim] (None: attn2 is self-attention). A context of k groups
        ([k*B, Lc, context_dim], see :func:`context_groups`) gives [k*B, L, dim]: the self-attention, which does not
        see the context, runs once per input, and its output is repeated for each group before the cross-attention."""
        x = x + self.attn1(self.norm1(x))
        groups = context_groups(context, x.shape[0])
        if groups > 1:
            x = x.repeat(groups, 1, 1)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context sequence (SD1: 1x1-conv projections;
    SD2: Linear projections, ``use_linear_proj=True``)."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear_proj: bool = False,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        inner = n_heads * d_head
        self.in_channels, self.context_dim, self.use_linear_proj = in_channels, context_dim, use_linear_proj
        self.norm = group_norm(in_channels, eps=1e-6)
        if use_linear_proj:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim, backend) for _ in range(depth)
        )
        nn.init.zeros_(self.proj_out.weight)  # the block starts as the identity, as in SD
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] -> same shape, residual around the transformer. A context of k groups ([k*B, Lc, D],
        :func:`context_groups`) gives [k*B, C, H, W], group by group, from one pass of the layers before the first
        cross-attention."""
        groups = context_groups(context, x.shape[0])
        residual = x if groups == 1 else x.repeat(groups, 1, 1, 1)
        _, _, h, w = x.shape
        x = self.norm(x)
        if not self.use_linear_proj:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear_proj:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_proj:
            x = self.proj_out(x)
        # contiguous again: as a channels-last view, the convolutions after it reorder their (contiguous) weights
        # on every call and their weight gradients back (docs/performance.md)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous()
        if not self.use_linear_proj:
            x = self.proj_out(x)
        return x + residual
