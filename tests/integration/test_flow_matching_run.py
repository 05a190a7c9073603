"""A flow-matching run end to end on a tiny budget: train.py with diffusion=flow trains both stages, its checkpoint
records the objective, the shift and the flow sampler, the sample grid, the pipeline (text-to-image and
image-to-image) and the shapes judge sample it with flow_euler, and a diffusion sampler is refused by name."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
from PIL import Image

from ldm.errors import ConfigError
from ldm.pipeline import LatentDiffusionPipeline
from tests.integration.tiny_run import read_metrics, run_train, train_cmd, train_env

FLOW = ["diffusion=flow", "diffusion.flow.shift=2.0", "vae_stage.max_steps=4", "ldm_stage.max_steps=6",
        "callbacks.ldm.samples.every_n_steps=3", "sampling.num_inference_steps=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    run_train(tmp, *FLOW, timeout=600)
    return tmp, tmp / "run"


def test_the_run_trains_and_records_the_flow_model(trained):
    _, run = trained
    ckpt = torch.load(run / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    header = ckpt["ldm"]
    assert header["prediction_type"] == "flow" and header["sampling"]["sampler"] == "flow_euler"
    assert header["schedule"] == {"objective": "flow_matching", "num_train_timesteps": 1000, "shift": 2.0,
                                  "resolution_shift": False}
    losses = [m["train/loss"] for _, m in sorted(read_metrics(run / "logs" / "version_1" / "metrics.csv").items())
              if "train/loss" in m]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert len(list((run / "ldm" / "samples").glob("samples_step*.png"))) == 2  # the grid sampled the flow model


def test_the_pipeline_samples_it_with_flow_euler(trained):
    _, run = trained
    pipe = LatentDiffusionPipeline.from_checkpoint(run / "ldm" / "checkpoints" / "last.ckpt")
    kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="tensor")
    seen = []
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, x0: seen.append(t),
             **kw)
    b = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    # the flow sampler's timesteps are noise levels x 1000, shifted as in training: 1 is pure noise
    assert seen[0] == pytest.approx(1000.0) and all(x > y for x, y in zip(seen, seen[1:], strict=False))
    seen.clear()
    pipe("a red circle", image=Image.new("RGB", (16, 16), (200, 30, 30)), strength=0.5,
         generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, x0: seen.append(t), **kw)
    assert len(seen) == 2
    with pytest.raises(ConfigError, match="trained with flow matching.*use sampler=flow_euler"):
        pipe("a red circle", sampler="euler", **kw)


def test_the_judge_runs_on_it(trained, tmp_path):
    from ldm.eval.shapes import main

    _, run = trained
    out = main([str(run / "ldm" / "checkpoints" / "last.ckpt"), "--n", "4", "--batch", "4", "--guidance", "3",
                "--steps", "3"])
    assert 0.0 <= out["guidance_3"]["full"] <= 1.0


def test_a_diffusion_sampler_for_a_flow_run_fails_fast(trained):
    tmp, _ = trained
    cmd = train_cmd(tmp / "refused", tmp / "shards", *FLOW, "sampling.sampler=dpm_solver++")
    proc = subprocess.run(cmd, cwd=tmp, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "sampler 'dpm_solver++' steps a diffusion model's noise schedule" in proc.stderr
    assert not (tmp / "refused" / "ldm").exists()
