"""End to end on a tiny budget: train.py (both stages) -> checkpoint -> pipeline, samplers, judge, errors."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.pipeline import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "vae_stage.max_steps=6", "vae_stage.batch_size=8", "ldm_stage.max_steps=6", "ldm_stage.batch_size=8",
    "ldm_stage.warmup_steps=2", "dataset.length=64", "dataset.maxcount=16", "callbacks.ldm.samples.every_n_steps=3",
    "sampling.num_inference_steps=4", "logger=csv", "trainer.log_every_n_steps=1",
    "ldm_stage.guide_snapshot_step=0.1", "sampling.autoguidance_scale=2",  # autoguidance end to end (opt-in)
]


def run_train(tmp: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp / 'run'}",
           f"data.train_shards={tmp / 'shards'}", *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    run_train(tmp)
    return tmp / "run"


def test_training_writes_checkpoints_configs_and_samples(trained):
    assert (trained / "vae" / "vae.ckpt").is_file()
    assert (trained / "ldm" / "checkpoints" / "last.ckpt").is_file()
    assert (trained / "ldm" / "config.yaml").is_file() and (trained / "vae" / "config.yaml").is_file()
    grids = sorted((trained / "ldm" / "samples").glob("samples_step*.png"))
    assert [g.name for g in grids] == ["samples_step000003.png", "samples_step000006.png"]
    assert Image.open(grids[-1]).size == (4 * 32, 2 * 32)
    ckpt = torch.load(trained / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ldm"]["config"]["ldm_stage"]["max_steps"] == 6  # the resolved config travels with the weights
    assert not any(p.name.endswith(".tmp") for p in trained.rglob("*"))  # atomic writes leave no temporaries


@pytest.fixture(scope="module")
def pipe(trained) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_checkpoint(trained / "ldm" / "checkpoints" / "last.ckpt")


def test_pipeline_text_to_image_is_reproducible_and_uses_its_knobs(pipe):
    a = pipe("a red circle in the top left", generator=torch.Generator().manual_seed(0), output_type="tensor")
    b = pipe("a red circle in the top left", generator=torch.Generator().manual_seed(0), output_type="tensor")
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)
    c = pipe("a red circle in the top left", negative_prompt="a blue square in the center",
             generator=torch.Generator().manual_seed(0), output_type="tensor")
    assert not torch.equal(a, c)
    images = pipe(["a green square in the center", "a white circle in the bottom left"], num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(1))
    assert len(images) == 4 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)


def test_the_checkpoint_carries_its_autoguidance_snapshot(pipe, trained):
    """A snapshot after 10% of the steps (here step 1 of 6) is saved; the pipeline loads it and guides with it."""
    ckpt = torch.load(trained / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ldm"]["guide"] == {"snapshot_step": 1, "text_encoder": True}
    assert ckpt["ldm"]["sampling"]["autoguidance_scale"] == 2.0 and bool(ckpt["state_dict"]["guide_taken"])
    assert pipe.guide_unet is not None and pipe.guide_text_encoder is not None
    unet, guide = pipe.unet.state_dict(), pipe.guide_unet.state_dict()
    assert unet.keys() == guide.keys() and any(not torch.equal(unet[k], guide[k]) for k in unet)

    def sample(**kw):
        return pipe("a red circle in the top left", generator=torch.Generator().manual_seed(0), output_type="tensor",
                    **kw)

    default = sample()
    assert torch.equal(default, sample(autoguidance_scale=2.0)) and not torch.equal(default, sample(
        autoguidance_scale=1.0))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++", "dpm++_2m_karras", "euler", "euler_a", "heun",
                                     "unipc"])
def test_pipeline_samplers_and_image_to_image(pipe, sampler):
    per_step = 2 if sampler == "heun" else 1  # Heun's callback runs at both halves of a step but the last
    steps = []
    out = pipe("a yellow triangle in the top right", sampler=sampler, num_inference_steps=5, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, x0: steps.append(t),
               output_type="tensor")
    assert len(steps) == 5 * per_step - (per_step - 1) and torch.isfinite(out).all()
    init = Image.new("RGB", (32, 32), (30, 30, 30))
    steps.clear()
    pipe("a red square in the center", image=init, strength=0.6, sampler=sampler, num_inference_steps=5,
         generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, x0: steps.append(t))
    assert len(steps) == 3 * per_step - (per_step - 1)  # strength 0.6 of 5 steps


def test_pipeline_bad_input(pipe, trained):
    with pytest.raises(ValueError, match="empty list"):
        pipe([])
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        pipe("x", guidance_scale=-1)
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        pipe("x", image=Image.new("RGB", (32, 32)), strength=1.5)
    with pytest.raises(ValueError, match="training timesteps"):
        pipe("x", num_inference_steps=5000)
    with pytest.raises(ValueError, match="multiples of the model's downsampling factor 4"):  # the VAE's
        pipe("x", height=30)
    with pytest.warns(UserWarning, match="resized to 32x32"):
        pipe("x", image=Image.new("RGB", (40, 24)), num_inference_steps=2)
    with pytest.warns(UserWarning, match="converted to RGB"):
        pipe("x", image=Image.new("L", (32, 32)), num_inference_steps=2)
    last = trained / "ldm" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=rf"VAE stage's autoencoder checkpoint.*cannot generate.*Pass the latent "
                                         rf"diffusion checkpoint: {re.escape(str(last))}"):
        LatentDiffusionPipeline.from_checkpoint(trained / "vae" / "vae.ckpt")


def test_judge_cli_runs_on_the_checkpoint(trained, tmp_path):
    from ldm.eval.shapes import main

    out = main([str(trained / "ldm" / "checkpoints" / "last.ckpt"), "--n", "8", "--batch", "8", "--guidance", "1",
                "3", "--json", str(tmp_path / "r.json")])
    assert set(out) == {"guidance_1", "guidance_3", "vae_psnr_db", "vae_reconstruction"}
    assert 0.0 <= out["vae_reconstruction"]["full"] <= 1.0 and out["vae_reconstruction"]["n"] == 1000
    assert 0.0 <= out["guidance_3"]["full"] <= 1.0 and (tmp_path / "r.json").is_file()


def test_judge_cli_compiles_the_unet_with_compile(trained, monkeypatch):
    import ldm.eval.shapes
    from ldm.eval.shapes import main
    from ldm.pipeline import LatentDiffusionPipeline

    compiled = []
    monkeypatch.setattr(LatentDiffusionPipeline, "compile_unet", lambda self: compiled.append(self) or self)
    # the VAE's figures do not depend on --compile: 8 images instead of 1,256 (most of a call's time on 2 cores)
    monkeypatch.setattr(ldm.eval.shapes, "vae_psnr", functools.partial(ldm.eval.shapes.vae_psnr, n=8))
    monkeypatch.setattr(ldm.eval.shapes, "vae_reconstructions",
                        functools.partial(ldm.eval.shapes.vae_reconstructions, n=8))
    args = [str(trained / "ldm" / "checkpoints" / "last.ckpt"), "--n", "4", "--batch", "4", "--guidance", "3"]
    main(args)
    assert not compiled
    main([*args, "--compile"])
    assert len(compiled) == 1 and isinstance(compiled[0], LatentDiffusionPipeline)


def test_ldm_stage_without_a_vae_says_how_to_get_one(tmp_path):
    proc = run_train(tmp_path, "stages=[ldm]", check=False)
    assert proc.returncode != 0
    assert "vae_ckpt=PATH" in proc.stderr and "stages=[vae,ldm]" in proc.stderr
