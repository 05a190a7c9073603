"""ldm_stage.compile: the LDM stage's UNet compiled in place keeps its state-dict and EMA names (checkpoints stay
loadable), its FLOPs are counted on the first step, which runs eagerly, and it trains as the eager UNet does."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.compiling import compile_in_place
from ldm.lightning.callbacks import Throughput
from tests.module_factory import diffusion_module
from tests.unit.test_lightning_modules import HashTextEncoder, collate, image_batches, tiny_unet, tiny_vae


def _trained(tmp_path, compiled: bool, steps: int):
    torch.manual_seed(0)
    unet, vae, text = tiny_unet(), tiny_vae(), HashTextEncoder()
    module = diffusion_module(unet, text, vae, schedule={"schedule": "cosine"}, prediction_type="v",
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), ema_decay=0.9, max_steps=steps)
    if compiled:
        compile_in_place(unet)  # as ldm.lightning.stages.train_ldm does with ldm_stage.compile=true
    throughput = Throughput()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[throughput])
    trainer.fit(module, DataLoader(image_batches(), batch_size=8, collate_fn=collate))
    return module, throughput


def _compare(tmp_path, monkeypatch, steps: int) -> dict:
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold: nothing from other runs
    counters.clear()
    eager, eager_flops = _trained(tmp_path / "eager", compiled=False, steps=steps)
    compiled, compiled_flops = _trained(tmp_path / "compiled", compiled=True, steps=steps)
    assert compiled.unet._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix: checkpoints load
    assert list(compiled.ema.state_dict()) == list(eager.ema.state_dict())
    assert compiled_flops.flops_per_step == eager_flops.flops_per_step > 0
    for name, value in eager.unet.state_dict().items():
        torch.testing.assert_close(compiled.unet.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    for name, value in eager.ema.averaged_state_dict().items():
        torch.testing.assert_close(compiled.ema.averaged_state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    return dict(counters["inductor"])


def test_the_first_step_of_a_compiled_unet_runs_eagerly_under_the_flop_counter(tmp_path, monkeypatch):
    """dynamo steps aside while a dispatch mode (the FLOP counter) is active: the counting step runs the eager
    UNet, so it counts what the compiled graphs compute, and compiles nothing."""
    inductor = _compare(tmp_path, monkeypatch, steps=1)
    assert not inductor.get("fxgraph_cache_miss") and not inductor.get("fxgraph_cache_hit")


@pytest.mark.slow  # compiles the forward and backward graphs: minutes on 2 cores
def test_a_compiled_unet_trains_as_the_eager_one(tmp_path, monkeypatch):
    inductor = _compare(tmp_path, monkeypatch, steps=3)
    assert inductor.get("fxgraph_cache_miss", 0) > 0  # the later steps ran inductor's graphs
