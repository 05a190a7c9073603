"""The FLOP count behind perf/tflops and perf/mfu against hand counts (a matmul (m, k) x (k, n) is 2*m*k*n FLOPs,
biases and element-wise work are not counted), and the device peaks MFU is measured against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.lightning.flops import PEAK_BF16_DENSE_FLOPS, count_flops, device_peak_flops, peak_for_name
from ldm.nn.attention import CrossAttention
from ldm.unet import UNet

TINY_UNET = Path(__file__).resolve().parents[2] / "conf" / "unet" / "tiny.yaml"


def test_conv2d_forward_and_backward_match_the_hand_count():
    torch.manual_seed(0)
    b, c_in, c_out, h, w = 2, 8, 16, 10, 10
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)  # stride 1, padding 1: a 10x10 output
    x = torch.randn(b, c_in, h, w)
    # each output value is a dot product of length c_in*3*3 (2 FLOPs a term); the bias add is not counted
    forward = 2 * b * c_out * h * w * c_in * 9
    assert forward == 460_800
    assert count_flops(lambda: conv(x)) == forward
    # backward: the weight gradient is a convolution of the same size; the input gradient another, only when needed
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward
    x.requires_grad_(True)
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_cross_attention_count_includes_the_attention_matmuls_on_cpu():
    torch.manual_seed(0)
    b, lq, lk, query_dim, context_dim, heads, d = 2, 36, 24, 64, 32, 4, 16
    inner = heads * d
    attn = CrossAttention(query_dim, context_dim, heads, d)
    x, context = torch.randn(b, lq, query_dim), torch.randn(b, lk, context_dim)
    projections = (2 * b * lq * query_dim * inner          # to_q
                   + 2 * (2 * b * lk * context_dim * inner)  # to_k, to_v
                   + 2 * b * lq * inner * query_dim)         # to_out
    scores = 2 * b * heads * lq * lk * d  # Q K^T; the same again for the probabilities times V
    assert projections + 2 * scores == 2_015_232
    assert count_flops(lambda: attn(x, context)) == projections + 2 * scores  # CPU SDPA counted (0 by torch 2.14)
    # backward: weight gradients of all four projections, input gradients of to_q and to_out (the context needs
    # none), and attention's 4 gradient matmuls of the size of Q K^T (dV, dP, dQ, dK): twice its forward, as model
    # FLOPs count it (torch's formula adds the flash kernels' recomputed scores, a fifth)
    x.requires_grad_(True)
    backward = projections + (2 * b * lq * query_dim * inner + 2 * b * lq * inner * query_dim) + 4 * scores
    assert count_flops(lambda: attn(x, context).sum().backward()) == projections + 2 * scores + backward


class HandCount:
    """Forward hooks that add up the FLOPs of every Conv2d, Linear and CrossAttention a forward runs, and the FLOPs
    of its backward given which inputs need gradients."""

    def __init__(self, model: nn.Module):
        self.forward = self.backward = 0
        attention_projections = set()
        self.handles = []
        for module in model.modules():
            if isinstance(module, CrossAttention):
                # q/k/v are counted from the attention's inputs (its context may be None: self-attention)
                attention_projections |= {id(module.to_q), id(module.to_k), id(module.to_v)}
                self.handles.append(module.register_forward_hook(self.attention, with_kwargs=True))
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                self.handles.append(module.register_forward_hook(self.conv))
            elif isinstance(module, nn.Linear) and id(module) not in attention_projections:
                self.handles.append(module.register_forward_hook(self.linear))

    def add(self, flops: int, input_needs_grad: bool, backward_factor: float | None = None) -> None:
        """Record a layer: its backward is the weight gradient (1x) plus, when needed, the input gradient (1x)."""
        self.forward += flops
        self.backward += flops * (backward_factor or (2 if input_needs_grad else 1))

    def conv(self, module: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        b, c_out, h, w = out.shape  # one dot product of length (c_in / groups) * kh * kw per output value
        kh, kw = module.kernel_size
        self.add(2 * b * c_out * h * w * (module.in_channels // module.groups) * kh * kw, args[0].requires_grad)

    def linear(self, module: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        tokens = args[0].numel() // module.in_features
        self.add(2 * tokens * module.in_features * module.out_features, args[0].requires_grad)

    def attention(self, module: CrossAttention, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        context = x if context is None else context
        (b, lq, query_dim), lk, inner = x.shape, context.shape[1], module.heads * module.dim_head
        self.add(2 * b * lq * query_dim * inner, x.requires_grad)                     # to_q
        self.add(2 * 2 * b * lk * module.context_dim * inner, context.requires_grad)  # to_k, to_v
        # Q K^T and P V: 2 matmuls of 2*b*heads*lq*lk*d each; backward 4 of them (model FLOPs: no recomputed scores)
        self.add(2 * (2 * b * module.heads * lq * lk * module.dim_head), True, backward_factor=2)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_tiny_unet_count_equals_the_sum_over_its_layers():
    torch.manual_seed(0)
    cfg = OmegaConf.to_container(OmegaConf.load(TINY_UNET))
    cfg.pop("_target_")
    cfg["context_dim"] = 128  # as train.yaml sets it: ${text_encoder.width} of scratch_tiny
    unet = UNet(**cfg)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 24, 128)

    hand = HandCount(unet)
    measured_forward = count_flops(lambda: unet(x, t, context))
    hand.remove()
    assert hand.forward == measured_forward
    # x and the time embedding's input need no gradient (conv_in and time_embed.0 get only weight gradients), nor
    # the context (k/v projections): so not quite 3x the forward
    measured_total = count_flops(lambda: unet(x, t, context).float().sum().backward())
    assert measured_total == hand.forward + hand.backward
    assert measured_total == pytest.approx(3 * measured_forward, rel=0.03)


def test_device_peaks():
    assert device_peak_flops(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert device_peak_flops() is None
    assert peak_for_name("NVIDIA H200") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12  # not the SXM part's 989e12, which "H100" alone would give
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_for_name("NVIDIA L40S") == 362e12 and peak_for_name("NVIDIA L4") == 121e12  # whole words only
    assert peak_for_name("Tesla V100-SXM2-16GB") is None  # no bf16
    assert peak_for_name("NVIDIA L40") is None  # not listed: no MFU rather than L4's peak
    assert all(1e14 <= peak <= 1e15 for peak in PEAK_BF16_DENSE_FLOPS.values())
