"""bench/unet.py --optimizer own: ours steps with the optimizer ldm's trainer builds for the precision."""

from __future__ import annotations

import pytest
import torch

from bench.unet import _ldm_optimizer


@pytest.mark.parametrize(("dtype", "fused"), [("fp32", True), ("bf16", True), ("fp16", None)])
def test_ours_gets_the_trainers_adamw_for_the_precision(dtype, fused):
    opt = _ldm_optimizer(dtype)([torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.AdamW
    # fused except under fp16, as ldm.lightning.stages.build_optimizer resolves conf/optimizer/adamw.yaml
    assert opt.defaults["fused"] is fused
    assert opt.defaults["lr"] == 1e-6 and opt.defaults["weight_decay"] == 0.01
    assert opt.defaults["betas"] == (0.9, 0.999)
