"""bench/mfu.py: the largest-batch search, the model's and the hardware's FLOPs of a step, and one CPU run whose FLOP
count matches the counter's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.mfu import TrainStep, largest_batch, step_flops
from bench.unet import CONFIGS
from ldm.lightning.flops import count_flops
from ldm.unet import UNet

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("capacity", [0, 1, 7, 8, 37, 64, 1000])
def test_largest_batch_finds_the_capacity_of_a_fake_device(capacity):
    tried = []

    def build(batch):
        tried.append(batch)
        if batch > capacity:
            raise torch.cuda.OutOfMemoryError(f"{batch} > {capacity}")
        return lambda: None

    found = largest_batch(build, nn.Linear(1, 1))
    assert found == capacity if capacity < 32 else capacity * 16 / 17 < found <= capacity  # to within 1/16
    assert len(tried) <= 2 * max(capacity, 8).bit_length() + 2  # doubling then bisecting, not a linear scan


def test_mfu_counts_the_models_flops_and_the_hardware_figure_the_recomputed_forward():
    cfg = dict(CONFIGS["tiny"])
    latent = cfg.pop("latent")
    torch.manual_seed(0)
    unet = UNet(**cfg, gradient_checkpointing=True).train()

    def build(batch):
        return TrainStep(unet, batch, latent, cfg["context_dim"], torch.device("cpu"), torch.float32)

    model, hardware = step_flops(build, unet, 3)
    assert unet.gradient_checkpointing  # restored
    unet.gradient_checkpointing = False
    assert model == count_flops(build(3).forward_backward)  # scaled from batch 1: every counted op is linear in it
    unet.gradient_checkpointing = True
    assert hardware == count_flops(build(3).forward_backward) > model * 1.2


def test_a_cpu_run_prints_the_step_flops_and_mfu_against_a_given_peak():
    out = subprocess.run([sys.executable, "bench/mfu.py", "--config", "tiny", "--device", "cpu", "--batch", "2",
                          "--steps", "2", "--threads", "1", "--peak", "1e11"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("config=tiny latent=8 batch=2") and "GFLOP per step" in lines[1]
    gflop = float(lines[1].split(", ")[1].split()[0])
    cfg = dict(CONFIGS["tiny"])
    latent = cfg.pop("latent")
    step = TrainStep(UNet(**cfg).train(), 2, latent, cfg["context_dim"], torch.device("cpu"), torch.float32)
    assert gflop == pytest.approx(count_flops(step.forward_backward) / 1e9, abs=0.05)  # printed to 0.1 GFLOP
    mfu = float(lines[2].split()[1].rstrip("%"))
    tflops = float(lines[1].split(", ")[2].split()[0])
    assert lines[2].endswith("of 0.100 TFLOP/s (the peak)")
    assert mfu == pytest.approx(tflops / 0.1 * 100, abs=0.6)  # TFLOP/s is printed to 0.001
