"""bench/kernel_families.py: each profiled op counted once in its family, the families' FLOPs against hand counts,
and the printed table for a UNet config and for the quickstart's VAE step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile

from bench.kernel_families import FAMILIES, attribute, family_flops, family_of, main

B, C_IN, C, SIDE = 2, 4, 8, 4  # a batch of 2 images of 4 channels, 4 x 4 pixels; 8 channels inside
TOKENS = SIDE * SIDE


class ConvLinearAttention(nn.Module):
    """One op of each family: a 3x3 convolution, GroupNorm, SiLU, a Linear over the pixels as tokens, and
    single-head self-attention over them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C_IN, C, 3, padding=1)
        self.norm = nn.GroupNorm(2, C)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv(x)))
        tokens = self.proj(h.flatten(2).transpose(1, 2).reshape(B * TOKENS, C))  # one addmm
        q = tokens.view(B, 1, TOKENS, C)
        return F.scaled_dot_product_attention(q, q, q)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor):
    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.fixture
def model_step():
    torch.manual_seed(0)
    model = ConvLinearAttention()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(B, C_IN, SIDE, SIDE)  # no gradient: the convolution's backward computes its weights' only
    return model, _step(model, opt, x), x


def test_families_name_the_profilers_ops_and_the_flop_counters_keys():
    assert family_of("aten::convolution_backward") == family_of("aten.convolution_backward") == "convolution backward"
    assert family_of("aten::addmm") == family_of("aten.bmm") == "matmul"
    assert family_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert family_of("aten._scaled_dot_product_efficient_attention") == "attention"
    assert family_of("aten::native_group_norm_backward") == "normalisation"
    assert family_of("Optimizer.step#AdamW.step") == "optimizer step"
    assert family_of("aten::add") is None and family_of("aten::mkldnn_convolution") is None  # inside a family's op
    assert len({name for name, _ in FAMILIES}) == len(FAMILIES)


def test_each_op_counts_once_in_its_outermost_family(model_step):
    _, step, _ = model_step
    step()
    with profile() as prof:
        step()
    calls = {family: share.calls for family, share in attribute(prof.events()).items()}
    # the forward's aten::convolution holds _convolution and mkldnn_convolution, aten::group_norm holds
    # native_group_norm, SDPA holds the CPU flash kernel: each counts once. The backward: the convolution's weight
    # gradient (one call), the Linear's two mm (input and weight gradients), the flash kernel's backward
    assert calls["convolution forward"] == 1 and calls["convolution backward"] == 1
    assert calls["matmul"] == 3
    assert calls["attention"] == 2
    assert calls["normalisation"] == 2 and calls["activations"] == 2
    assert calls["optimizer step"] == 1  # its inner foreach ops are inside Optimizer.step
    shares = attribute(prof.events())
    assert all(share.time_us > 0 for share in shares.values())


def test_attentions_inner_matmuls_stay_attention(model_step):
    """The math back end computes attention with two batched matmuls inside the SDPA op: they are attention's time,
    not the matmul family's, which keeps the Linear's one addmm."""
    model, _, x = model_step
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), profile() as prof:
        model(x)
    inner = [e for e in prof.events() if e.name in ("aten::bmm", "aten::matmul")]
    assert inner, "the math back end ran no matmul: the test would not test the nesting"
    calls = {family: share.calls for family, share in attribute(prof.events()).items()}
    assert calls["attention"] == 1 and calls["matmul"] == 1


def test_family_flops_are_the_hand_counts(model_step):
    _, step, _ = model_step
    flops = family_flops(step)
    conv = 2 * B * TOKENS * C * C_IN * 9  # multiply-adds of the output pixels
    linear = 2 * B * TOKENS * C * C
    attention = 4 * B * TOKENS * TOKENS * C  # q k^T and p v
    assert flops["convolution forward"] == conv
    assert flops["convolution backward"] == conv  # the weight gradient only: the input needs none
    assert flops["matmul"] == linear * 3  # forward, and the input and weight gradients
    assert flops["attention"] == attention + attention * 5 // 2  # the backward's five products
    assert set(flops) == {"convolution forward", "convolution backward", "matmul", "attention"}


def test_the_table_of_a_unet_config(capsys):
    main(["--config", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--matmul-size", "512",
          "--threads", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config=tiny latent=8 batch=2 dtype=fp32 device=cpu threads=1")
    assert "GFLOP per step" in out[1] and "a 512 x 512 matmul" in out[1]
    rows = {line[:26].strip(): line[26:].split() for line in out[3:]}
    assert set(rows) == {name for name, _ in FAMILIES} | {"other"}
    for family in ("convolution forward", "convolution backward", "matmul", "attention"):
        calls, ms, share, gflop, rate, of_matmul = rows[family]
        assert int(calls) > 0 and float(ms) > 0 and float(gflop) > 0 and float(rate) > 0
        assert share.endswith("%") and of_matmul.endswith("%")
    shares = [float(cells[2 if name != "other" else 1].rstrip("%")) for name, cells in rows.items()]
    assert sum(shares) == pytest.approx(100, abs=0.5)  # the families and the rest make up the profiled step


def test_the_quickstart_vae_step_with_its_heaviest_ops(capsys):
    main(["--step", "vae", "--steps", "1", "--warmup", "1", "--matmul-size", "512", "--threads", "1",
          "--top", "3"])
    out = capsys.readouterr().out
    assert out.startswith("the quickstart's vae step dtype=fp32")
    heaviest = out.split("of most own CPU time:\n")[1].splitlines()
    assert len(heaviest) == 3 and all("ms/step" in line and "aten::" in line for line in heaviest)


def test_the_quickstart_steps_run_on_the_cpu_only_and_at_their_own_batch(capsys):
    with pytest.raises(SystemExit, match="give --config"):
        main(["--step", "ldm", "--device", "cuda"])
    with pytest.raises(SystemExit):
        main(["--step", "vae", "--batch", "4"])
    assert "--batch and --latent go with --config" in capsys.readouterr().err
