"""CUDA-only: train.py on one GPU in bf16-mixed, under trainer=gpu and trainer=fsdp, end to end on shards.

Skips without a CUDA device (CI has none); run where a GPU is lent: ``pytest tests/gpu -m cuda``.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from tests.integration.tiny_run import read_metrics, run_train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where a GPU is lent)"),
]

STEPS = ["vae_stage.max_steps=6", "ldm_stage.max_steps=7", "callbacks.ldm.checkpoint.every_n_train_steps=4",
         "ldm_stage.ema_decay=0.9", "ldm_stage.cache_latents=false", "callbacks.ldm.samples.every_n_steps=4",
         "trainer.devices=1", "trainer.log_every_n_steps=1", "trainer.precision=bf16-mixed"]  # quickstart: fp32


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    run_train(tmp, *STEPS, "trainer=gpu", "stages=[vae]", run_dir=tmp / "vae", timeout=600)
    return tmp, tmp / "vae" / "vae" / "vae.ckpt"


@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_bf16_ldm_stage_on_one_gpu(vae, trainer: str) -> None:
    """bf16-mixed trains with finite losses; the checkpoint holds full fp32 weights and fp32 EMA shadows; the grid
    is written; a run resumed from the step-4 checkpoint (the only periodic one kept) logs the uninterrupted run's
    losses."""
    tmp, vae_ckpt = vae
    run = tmp / trainer
    run_train(tmp, *STEPS, f"trainer={trainer}", "stages=[ldm]", f"vae_ckpt={vae_ckpt}", run_dir=run, timeout=600)
    ckpt = torch.load(run / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 7
    sd = ckpt["state_dict"]
    shadows = {k: v for k, v in sd.items() if k.startswith("ema.") and k != "ema.num_updates"}  # by parameter name
    unet = {k: v for k, v in sd.items() if k.startswith("unet.") and v.is_floating_point()}
    assert len(shadows) == len(unet) > 0
    assert all(v.dtype == torch.float32 for v in (*shadows.values(), *unet.values()))
    assert int(sd["ema.num_updates"]) == 7
    metrics = read_metrics(run / "logs" / "version_0" / "metrics.csv")
    losses = [metrics[s]["train/loss"] for s in range(7)]
    assert all(math.isfinite(v) for v in losses), losses
    assert metrics[6]["perf/images_per_s"] > 0
    assert len(list((run / "ldm" / "samples").glob("*.png"))) == 2

    resumed = tmp / f"{trainer}_resumed"  # a copy cut back to step 4: a resumed run continues in its own folder
    shutil.copytree(run, resumed)
    (resumed / "ldm" / "checkpoints" / "last.ckpt").unlink()
    run_train(tmp, *STEPS, f"trainer={trainer}", "stages=[ldm]",
              f"resume={resumed / 'ldm' / 'checkpoints' / 'step000004.ckpt'}", run_dir=resumed, timeout=600)
    again = read_metrics(resumed / "logs" / "version_0" / "metrics.csv")
    for step in range(4, 7):  # GPU kernels are not bitwise deterministic: close, not equal
        assert again[step]["train/loss"] == pytest.approx(metrics[step]["train/loss"], rel=2e-2), step


def strict_steps():
    """A callback: torch.cuda.set_sync_debug_mode("error") from each step's start (after the first) to the next's,
    so Lightning's collection of the logged values in between is watched too."""
    import lightning as L

    class StrictSteps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("error" if batch_idx >= 1 else "default")

        def on_train_end(self, trainer, pl_module):
            torch.cuda.set_sync_debug_mode("default")

    return StrictSteps()


def test_the_training_step_never_waits_for_the_gpu(tmp_path) -> None:
    """Under torch.cuda.set_sync_debug_mode("error") a host wait (an .item(), a blocking copy) raises: the ldm
    stage's step (a trainable text encoder, the frozen VAE's posterior sample, bf16-mixed, fused AdamW, clipping,
    EMA, the device-side non-finite test, the logging and Lightning's collection of the logged values) runs without
    one from its second step on."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ldm.lightning.callbacks import Throughput
    from ldm.text import ScratchTextEncoder
    from tests.module_factory import diffusion_module
    from tests.unit.test_lightning_modules import collate, fused_adamw, image_batches, tiny_unet, tiny_vae

    text = ScratchTextEncoder(width=32, layers=1, heads=2, context_length=8)
    module = diffusion_module(tiny_unet(), text, tiny_vae(), ema_decay=0.99, optimizer=fused_adamw)
    trainer = L.Trainer(max_steps=6, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, gradient_clip_val=1.0, callbacks=[strict_steps(), Throughput()])
    try:
        trainer.fit(module, DataLoader(image_batches(24), batch_size=4, collate_fn=collate, pin_memory=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert module.nonfinite.on_device and trainer.global_step == 6 and module.nan_skips == 0


def test_the_autoencoder_step_never_waits_for_the_gpu(tmp_path) -> None:
    """The vae stage's step (generator and PatchGAN discriminator, bf16-mixed, fused Adam, the device-side
    non-finite test of both updates, logging) runs without a host wait from its second step on."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ldm.lightning.autoencoder_module import AutoencoderModule
    from ldm.lightning.callbacks import Throughput
    from tests.unit.test_lightning_modules import collate, image_batches, tiny_vae

    module = AutoencoderModule(tiny_vae(), lr=1e-3, disc_start=2, disc_layers=2, disc_channels=8)
    trainer = L.Trainer(max_steps=6, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[strict_steps(), Throughput()])
    try:
        trainer.fit(module, DataLoader(image_batches(48), batch_size=8, collate_fn=collate, pin_memory=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert module.nonfinite.on_device and trainer.global_step == 6


def test_lagged_reads_of_gpu_values_are_the_values_pushed() -> None:
    """LaggedReads' CUDA path (a pinned, non-blocking copy and an event): a value read two steps late is the one
    pushed, though the GPU was still busy at the push and the tensor was changed in place after it."""
    from ldm.lightning.host_reads import LaggedReads

    reads = LaggedReads(lag=2)
    big = torch.randn(4096, 4096, device="cuda")
    value = torch.zeros((), device="cuda")
    for step in range(4):
        for _ in range(4):
            big = big @ big / 64  # queued work the copy must wait behind
        value.fill_(step + 0.5)
        reads.push(step, value)
        value.add_(100)  # queued after the push: must not show in the value read
        assert reads.due(step) == ([(step - 2, step - 2 + 0.5)] if step >= 2 else [])
    assert reads.drain() == [(2, 2.5), (3, 3.5)]


def test_a_non_finite_step_is_skipped_on_the_gpu(tmp_path) -> None:
    """With fused AdamW on the GPU the non-finite test and the skip run on the device: the NaN steps leave the
    weight as it was, and the count read two steps late reaches the module."""
    from tests.unit.test_lightning_modules import skipped_nan_steps

    module, _ = skipped_nan_steps(tmp_path, accelerator="gpu")
    assert module.unet.w.is_cuda and torch.isfinite(module.unet.w)
    assert module.ema.num_updates == 4 and torch.isfinite(module.ema.shadow_0)
