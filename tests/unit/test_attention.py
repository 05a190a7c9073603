"""Attention back ends, CrossAttention and the SD transformer blocks."""

from __future__ import annotations

import pytest
import torch

from ldm.nn import attention as attn_mod
from ldm.nn.attention import (
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    attention,
    resolve_backend,
    reuse_context_projections,
)


def _qkv(b: int = 2, h: int = 2, lq: int = 5, lk: int = 7, d: int = 8, scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, n, d, generator=g) * scale for n in (lq, lk, lk))


def test_sdpa_and_math_agree() -> None:
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"))


def test_backends_agree_with_bool_and_additive_masks() -> None:
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 4:] = False
    out_math = attention(q, k, v, mask, backend="math")
    torch.testing.assert_close(attention(q, k, v, mask, backend="sdpa"), out_math)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, additive, backend="math"), out_math)
    torch.testing.assert_close(attention(q, k, v, additive, backend="sdpa"), out_math)
    # masked keys do not matter
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:] += 100.0
    v2[0, :, 4:] -= 50.0
    torch.testing.assert_close(attention(q, k2, v2, mask, backend="math"), out_math)


def test_a_query_with_every_key_masked_attends_to_nothing_in_both_backends() -> None:
    """SDPA gives zeros for a row whose keys are all masked; the reference backend gave NaN."""
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1] = False
    expected = attention(q, k, v, mask, backend="sdpa")
    assert torch.equal(expected[1], torch.zeros_like(expected[1]))
    torch.testing.assert_close(attention(q, k, v, mask, backend="math"), expected)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, additive, backend="math"), expected)
    k[0, 0, 0, 0] = float("nan")  # a NaN input still gives NaN, as in SDPA (only masked-out rows are zeroed)
    assert attention(q, k, v, mask, backend="math")[0].isnan().any()


def test_math_softmax_in_fp32_under_bf16_autocast() -> None:
    q, k, v = (t.bfloat16() for t in _qkv(d=16, scale=30.0))  # logits up to ~1e4
    reference = attention(q.float(), k.float(), v.float(), backend="math")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, backend="math")
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.02)


def _grads(fn, inputs, grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad.to(leaves[0].dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_half_precision_sdpa_on_the_cpu_runs_in_float32(dtype: torch.dtype, mask_kind: str | None, layout: str) -> None:
    """Half-precision CPU tensors take torch's float32 kernel (its bf16 backward is the slow one): the output is
    float32 SDPA's of the same half inputs, rounded once; the gradients are nearer the float64 ones than torch's own
    half-precision kernel's; the masked keys stay out. ``transposed``: q, k and v are views whose last dimension is
    not the dense one, as the VAE's attention block passes them."""
    q, k, v = (t.to(dtype) for t in _qkv(lq=16, lk=24, d=16, scale=2.0))
    if layout == "transposed":
        q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
        assert q.stride(-1) != 1
    dense = [t.contiguous() for t in (q, k, v)]  # the references run torch's flash kernels on these
    mask = None
    if mask_kind is not None:
        mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
        mask[0, ..., 17:] = False
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref_mask = mask.float() if mask_kind == "additive" else mask
    out = attention(*(t.clone().requires_grad_() for t in (q, k, v)), mask, backend="sdpa")
    assert out.dtype == dtype
    torch.testing.assert_close(out, sdpa(*(t.float() for t in dense), attn_mask=ref_mask).to(dtype), rtol=0, atol=0)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = _grads(lambda *t: attention(*t, mask, backend="sdpa"), (q, k, v), grad)
    native = _grads(lambda *t: sdpa(*t, attn_mask=mask), dense, grad)
    float32 = _grads(lambda *t: sdpa(*t, attn_mask=ref_mask), [t.float() for t in dense], grad)
    exact_mask = mask.double() if mask_kind == "additive" else mask
    exact = _grads(lambda *t: sdpa(*t, attn_mask=exact_mask), [t.double() for t in dense], grad)
    for o, n, f, e in zip(ours, native, float32, exact, strict=True):
        assert o.dtype == dtype
        assert (o.float() - f).norm() < 1e-2 * f.norm()
        assert (o.double() - e).norm() < (n.double() - e).norm()
    if mask_kind is not None:  # no gradient reaches a masked key or value
        assert ours[1][0, :, 17:].abs().max() == 0 and ours[2][0, :, 17:].abs().max() == 0
    # and it is attention: within half precision of torch's own kernel on the same inputs
    torch.testing.assert_close(out.float(), sdpa(*dense, attn_mask=mask).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sdpa_on_the_cpu_keeps_half_precision_tensors_for_the_backward(dtype: torch.dtype) -> None:
    """What the float32 computation keeps for the backward is the half-precision q, k, v and output, as torch's
    own half-precision kernel keeps: not their float32 copies (twice the memory)."""
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(lq=16, lk=24, d=16))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention(q, k, v, backend="sdpa").sum().backward()
    large = [t for t in saved if t.numel() >= q.numel()]
    assert len(large) == 4 and all(t.dtype == dtype for t in large)
    assert all(g.dtype == dtype for g in (q.grad, k.grad, v.grad))


def test_half_precision_sdpa_on_the_cpu_without_gradients_keeps_the_half_kernel() -> None:
    """Sampling needs no backward, and the half-precision forward is the faster one: it runs as torch's own."""
    q, k, v = (t.bfloat16() for t in _qkv(lq=16, lk=24, d=16, scale=2.0))
    native = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, backend="sdpa"), native, rtol=0, atol=0)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), native, rtol=0, atol=0)  # nothing requires grad
    with_grad = attention(q.clone().requires_grad_(), k, v, backend="sdpa")
    assert not torch.equal(with_grad, native)  # the float32 kernel, rounded once: other bits


def test_half_precision_sdpa_under_cpu_autocast_matches_float32() -> None:
    """Under CPU bf16 autocast (Lightning's bf16-mixed), CrossAttention's output and input gradient stay within bf16
    rounding of the float32 layer's."""
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=32, context_dim=16, heads=4, dim_head=8)
    x = torch.randn(3, 20, 32, requires_grad=True)
    ctx = torch.randn(3, 7, 16)
    ref = layer(x, ctx)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, ctx)
    assert out.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(out.float().square().sum(), x)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    assert torch.nn.functional.cosine_similarity(g.flatten(), gref.flatten(), dim=0) > 0.999


def test_math_backend_does_not_overflow_in_fp16() -> None:
    q, k, v = _qkv(d=16, scale=100.0)
    naive_logits = q.half() @ k.half().transpose(-1, -2)
    assert torch.isinf(naive_logits).any()  # half precision logits would overflow
    out = attention(q.half(), k.half(), v.half(), backend="math")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), attention(q, k, v, backend="math"), atol=0.05, rtol=0.01)


def test_unknown_backend_names_allowed_values() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="allowed values are auto, sdpa, xformers, math"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="allowed values"):
        CrossAttention(8, backend="nope")


def test_xformers_explicit_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv()
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: False)
    with pytest.raises(ValueError, match="not installed.*pip install"):
        attention(q, k, v, backend="xformers")
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: True)
    monkeypatch.setattr(attn_mod, "xformers_kernel_problem", lambda: None)
    with pytest.raises(ValueError, match="needs CUDA tensors.*backend='sdpa'"):
        attention(q, k, v, backend="xformers")
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "xformers"
    assert resolve_backend("xformers", torch.device("cuda")) == "xformers"
    # installed, but built for another torch/CUDA (its kernels did not load): explicit raises, auto says and uses sdpa
    problem = "xformers 0.0.35 is installed but its compiled kernels did not load"
    monkeypatch.setattr(attn_mod, "xformers_kernel_problem", lambda: problem)
    with pytest.raises(ValueError, match="cannot run: xformers 0.0.35 .* did not load.*matches your torch"):
        resolve_backend("xformers", torch.device("cuda"))
    attn_mod._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="'auto' uses sdpa: xformers 0.0.35"):
        assert resolve_backend("auto", torch.device("cuda")) == "sdpa"
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda")) == "sdpa"


def test_dense_bias_is_an_aligned_additive_bias() -> None:
    """The bias handed to the fused CUDA kernels: q's dtype, full shape, -inf where masked, rows 8-aligned."""
    q, k, _ = _qkv(lq=5, lk=7)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 4:] = False
    bias = attn_mod.dense_bias(mask, q.bfloat16(), k)
    assert bias.shape == (2, 2, 5, 7) and bias.dtype == torch.bfloat16 and bias.stride(-2) == 8
    assert torch.isinf(bias[0, ..., 4:]).all() and (bias[0, ..., :4] == 0).all() and (bias[1] == 0).all()
    additive = torch.randn(1, 2, 1, 7)
    torch.testing.assert_close(attn_mod.dense_bias(additive, q, k), additive.expand(2, 2, 5, 7))


def test_attention_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\[B, heads, L, d\]"):
        attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_cross_attention_shapes_names_and_errors() -> None:
    ca = CrossAttention(16, context_dim=12, heads=2, dim_head=4)
    assert set(ca.state_dict()) == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    assert ca(x, ctx).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="feature dimension 16, expected context_dim=12"):
        ca(x)
    self_attn = CrossAttention(16, heads=2, dim_head=4)
    assert self_attn(x).shape == (2, 5, 16)


def test_half_precision_cpu_training_takes_3d_masks_and_trains_a_learned_bias() -> None:
    """The float32 kernel pair takes 2-d or 4-d masks and gives the bias no gradient: a [heads, Lq, Lk] mask and a
    bias that requires grad go through autograd instead, as torch's own SDPA takes them."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(lq=9, lk=11, d=16))
    mask = torch.rand(q.shape[1], 9, 11, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[..., 0] = True
    out = attention(q.clone().requires_grad_(), k, v, mask, backend="sdpa")
    torch.testing.assert_close(out.float(), sdpa(q.float(), k.float(), v.float(), attn_mask=mask), rtol=2e-2, atol=2e-2)
    bias = torch.randn(1, q.shape[1], 9, 11, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = attention(q.clone().requires_grad_(), k, v, bias.to(torch.bfloat16), backend="sdpa")
    out.float().square().sum().backward()
    reference = bias.detach().clone().requires_grad_()
    sdpa(q.float(), k.float(), v.float(), attn_mask=reference).square().sum().backward()
    assert bias.grad is not None
    torch.testing.assert_close(bias.grad, reference.grad, rtol=5e-2, atol=5e-2)


def test_cross_attention_key_padding_mask_and_backends() -> None:
    torch.manual_seed(0)
    ca_sdpa = CrossAttention(16, 12, heads=2, dim_head=8, backend="sdpa")
    ca_math = CrossAttention(16, 12, heads=2, dim_head=8, backend="math")
    ca_math.load_state_dict(ca_sdpa.state_dict())
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 4, 12)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = ca_sdpa(x, ctx, mask)
    torch.testing.assert_close(out, ca_math(x, ctx, mask))
    ctx2 = ctx.clone()
    ctx2[0, 2:] = 9.0
    torch.testing.assert_close(ca_sdpa(x, ctx2, mask), out)


def test_feedforward_and_block_names() -> None:
    ff = FeedForward(8)
    assert {"net.0.proj.weight", "net.2.weight"} <= set(ff.state_dict())
    assert ff.net[0].proj.out_features == 64
    block = BasicTransformerBlock(16, 2, 8, context_dim=12)
    names = {k.split(".")[0] for k in block.state_dict()}
    assert names == {"attn1", "attn2", "ff", "norm1", "norm2", "norm3"}
    assert block(torch.randn(2, 5, 16), torch.randn(2, 3, 12)).shape == (2, 5, 16)


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer(linear: bool) -> None:
    st = SpatialTransformer(32, n_heads=2, d_head=16, depth=2, context_dim=12, use_linear_proj=linear)
    assert st.proj_in.weight.ndim == (2 if linear else 4)
    assert len(st.transformer_blocks) == 2
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(st(x, torch.randn(2, 3, 12)), x)  # zero-initialised proj_out: identity at init
    with torch.no_grad():
        st.proj_out.weight.normal_()
    out = st(x, torch.randn(2, 3, 12))
    assert out.shape == x.shape and not torch.allclose(out, x)
    # in the input's (contiguous) layout, not the channels-last view of the tokens: a convolution given that view
    # reorders its weight on every call
    assert out.is_contiguous()


def test_xformers_wrapper_follows_its_documented_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our call into xformers, checked on CPU against a stand-in written from xformers' docstring: inputs [B, M, H, K],
    softmax(q k^T / sqrt(K) + attn_bias) v with attn_bias [B, H, Mq, Mk] in q's dtype, rows 8-aligned in memory."""
    import sys
    import types

    seen = {}

    def memory_efficient_attention(query, key, value, attn_bias=None):
        assert query.shape[0] == key.shape[0] and query.shape[2] == key.shape[2]  # [B, M, H, K]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) / query.shape[-1] ** 0.5
        if attn_bias is not None:
            seen["bias"] = attn_bias
            assert attn_bias.dtype == query.dtype and attn_bias.stride(-2) % 8 == 0
            logits = logits + attn_bias
        return (logits.softmax(-1) @ v).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q, k, v = _qkv(lq=5, lk=7)
    torch.testing.assert_close(attn_mod._xformers_attention(q, k, v, None), attention(q, k, v, backend="math"))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 4:] = False
    out = attn_mod._xformers_attention(q, k, v, mask)
    torch.testing.assert_close(out, attention(q, k, v, mask, backend="math"))
    assert seen["bias"].shape == (2, 2, 5, 7)


def test_context_projections_are_computed_once_per_context_tensor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(CrossAttention(16, 12, heads=2, dim_head=8))
    layer = model[0]
    x, ctx, other = torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    with torch.no_grad():
        ref = [layer(x, ctx), layer(x + 1, ctx), layer(x, other)]
    projected = []
    layer.to_k.register_forward_hook(lambda module, args, out: projected.append(args[0]))
    with torch.no_grad(), reuse_context_projections(model):
        got = [layer(x, ctx), layer(x + 1, ctx), layer(x, other), layer(x, ctx)]
    assert [p is ctx for p in projected] == [True, False]  # ctx once, then other once; the 4th call reused ctx's
    assert layer._kv_cache is None  # the cache ends with the block
    for g, r in zip(got, [*ref, ref[0]], strict=False):
        torch.testing.assert_close(g, r)
    projected.clear()
    with reuse_context_projections(model):  # with autograd on, nothing is cached (the keys carry the graph)
        layer(x, ctx), layer(x, ctx)
    assert len(projected) == 2


def test_half_precision_sdpa_on_the_cpu_with_shapes_the_flash_kernel_refuses() -> None:
    """Values of another head size than the queries' (the flash kernel wants one): SDPA's float32 path, same output."""
    q, k = (t.bfloat16() for t in _qkv(lq=16, lk=24, d=16)[:2])
    v = torch.randn(2, 2, 24, 8).bfloat16()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, backend="sdpa")
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in leaves)


@pytest.mark.parametrize("additive", [False, True])
def test_a_fully_masked_query_has_zero_output_and_finite_gradients_in_math(additive):
    """The math back end cleared a fully masked query's output but, with an additive -inf mask, its softmax's
    backward gave NaN gradients to q and to every key of the batch and head; now as SDPA: zeros, finite gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    allowed = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    allowed[..., 1, :] = False  # query 1 may attend to nothing
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")) if additive else allowed
    out = attention(q, k, v, mask, backend="math")
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    reference = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    attention(*reference, mask, backend="sdpa").square().sum().backward()
    for ours, theirs in zip((q, k, v), reference, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
