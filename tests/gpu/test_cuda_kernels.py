"""CUDA-only checks: the attention kernels (SDPA, xformers) against the fp32 math reference in fp32/bf16/fp16, the
UNet under bf16 autocast against diffusers on the same weights, and checkpointing on the GPU.

These need a CUDA device and skip without one (CI has none); run them where a GPU is lent:
``pytest tests/gpu -m cuda`` (docs/gpu.md records the last run's figures).
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.nn.attention import attention, resolve_backend, xformers_available, xformers_kernel_problem
from ldm.unet import UNet

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where a GPU is lent)"),
]
XFORMERS_PROBLEM = ("xformers is not installed" if not xformers_available() else xformers_kernel_problem()
                    if torch.cuda.is_available() else "no CUDA")
needs_xformers = pytest.mark.skipif(XFORMERS_PROBLEM is not None, reason=str(XFORMERS_PROBLEM))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |err| against the fp32 math reference, relative to max |reference|: the kernels' own rounding at each dtype
TOL = {"fp32": 2e-3, "bf16": 2e-2, "fp16": 4e-3}  # fp32 SDPA may use TF32 matmuls on Hopper


def _qkv(b: int, h: int, lq: int, lk: int, d: int, scale: float = 1.0):
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(b, h, n, d, generator=g, device="cuda") * scale for n in (lq, lk, lk))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


# SD shapes: self-attention over a 64x64 latent's 4096 tokens (head dim 40, SD 1.x) and cross-attention over 77 CLIP
# tokens (head dim 64, SD 2.x), plus odd lengths that no kernel tiles evenly.
SHAPES = [(2, 8, 4096, 4096, 40), (2, 5, 1024, 77, 64), (3, 2, 33, 77, 80)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["sdpa", pytest.param("xformers", marks=needs_xformers)])
def test_cuda_backend_matches_fp32_math(backend: str, shape: tuple[int, ...], dtype: str) -> None:
    q, k, v = _qkv(*shape)
    ref = attention(q, k, v, backend="math")
    out = attention(*(t.to(DTYPES[dtype]) for t in (q, k, v)), backend=backend)
    assert out.dtype == DTYPES[dtype] and out.shape == ref.shape
    assert _rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["sdpa", "math", pytest.param("xformers", marks=needs_xformers)])
def test_cuda_backends_honour_padding_masks(backend: str) -> None:
    """A key-padding mask (bool, or additive with -inf) over 77 tokens: masked keys and values do not matter."""
    q, k, v = _qkv(2, 4, 64, 77, 64)
    mask = torch.ones(2, 1, 1, 77, dtype=torch.bool, device="cuda")
    mask[0, ..., 9:] = False
    ref = attention(q[:1], k[:1, :, :9], v[:1, :, :9], backend="math")  # attending to the 9 kept keys only
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 9:] += 100.0
    v2[0, :, 9:] -= 50.0
    additive = torch.zeros(mask.shape, device="cuda").masked_fill(~mask, float("-inf"))
    for m in (mask, additive):
        out = attention(*(t.bfloat16() for t in (q, k2, v2)), m, backend=backend)
        assert _rel_err(out[:1], ref) < TOL["bf16"]


@pytest.mark.parametrize("backend", ["sdpa", "math", pytest.param("xformers", marks=needs_xformers)])
def test_cuda_fp16_large_logits_stay_finite(backend: str) -> None:
    """Logits past fp16's range (~1e5): the math path's fp32 softmax and the fused kernels stay finite and right."""
    q, k, v = (t.half() for t in _qkv(2, 2, 128, 77, 64, scale=40.0))
    ref = attention(q.float(), k.float(), v.float(), backend="math")  # near one-hot: compare on the same fp16 inputs
    with torch.autocast("cuda", dtype=torch.float16):
        out = attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 2e-2


SMALL = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
             attention_resolutions=(2, 4), num_head_channels=32, context_dim=256, use_linear_proj=True)


def _unet(**kw) -> UNet:
    torch.manual_seed(0)
    unet = UNet(**{**SMALL, **kw})
    with torch.no_grad():  # non-zero everywhere (the zero-initialised output convs would hide errors)
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet.cuda()


def _inputs(batch: int = 2, size: int = 32):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g, device="cuda")
    ctx = torch.randn(batch, 77, 256, generator=g, device="cuda")
    return x, torch.tensor([10, 900][:batch], device="cuda"), ctx


@pytest.mark.parametrize("backend", ["sdpa", "math", pytest.param("xformers", marks=needs_xformers)])
def test_cuda_unet_bf16_matches_diffusers_fp32(backend: str) -> None:
    """Our UNet under bf16 autocast, on each back end, against diffusers' UNet2DConditionModel in fp32."""
    from ldm.convert import to_diffusers  # noqa: PLC0415  (diffusers is a test dependency)

    ours = _unet(attention_backend=backend)
    theirs = to_diffusers(ours.cpu(), sample_size=32).cuda()
    ours.cuda()
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = theirs(x, t, ctx).sample.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = ours(x, t, ctx)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 3e-2
    with torch.no_grad():  # and in fp32 they agree to the kernels' rounding
        assert _rel_err(ours(x, t, ctx), ref) < 2e-3


def test_cuda_bf16_training_step_gradients_match_fp32() -> None:
    """A bf16-autocast backward gives the fp32 gradients to bf16 precision (cosine similarity per tensor)."""
    x, t, ctx = _inputs()
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        unet = _unet(attention_backend="sdpa")
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = unet(x, t, ctx).float().square().mean()
        loss.backward()
        grads.append({n: p.grad.float().flatten() for n, p in unet.named_parameters()})
    flat = [torch.cat(list(g.values())) for g in grads]
    assert torch.isfinite(flat[1]).all()
    assert torch.nn.functional.cosine_similarity(flat[1], flat[0], dim=0) > 0.99
    biggest = max(g.norm() for g in grads[0].values())
    for name, g32 in grads[0].items():  # tensors with a real share of the gradient (not ~1e-11 rounding noise)
        if g32.norm() > 1e-3 * biggest:
            assert torch.nn.functional.cosine_similarity(grads[1][name], g32, dim=0) > 0.98, name


def test_cuda_gradient_checkpointing_gives_equal_gradients() -> None:
    x, t, ctx = _inputs()
    grads = []
    for ckpt in (False, True):
        unet = _unet(attention_backend="sdpa", gradient_checkpointing=ckpt)
        unet(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(not xformers_available() or XFORMERS_PROBLEM is None, reason="needs an xformers without kernels")
def test_cuda_broken_xformers_build_is_named_not_crashed() -> None:
    """xformers installed for another torch/CUDA: 'xformers' says why and how to fix; 'auto' warns and uses sdpa."""
    with pytest.raises(ValueError, match="compiled kernels did not load.*backend='sdpa'"):
        resolve_backend("xformers", torch.device("cuda"))
    assert resolve_backend("auto", torch.device("cuda")) == "sdpa"


def test_cuda_judge_psnr_with_the_vae_on_the_gpu() -> None:
    """The shapes judge's VAE PSNR runs with the VAE on CUDA (its held-out images follow the VAE to the device) and
    agrees with the same VAE on the CPU."""
    from ldm.autoencoder import AutoencoderKL
    from ldm.eval.shapes import vae_psnr

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4,
                        embed_dim=4).eval()
    on_cpu = vae_psnr(vae, size=32, n=16)
    on_gpu = vae_psnr(vae.cuda(), size=32, n=16)
    assert math.isfinite(on_gpu) and abs(on_gpu - on_cpu) < 0.05
