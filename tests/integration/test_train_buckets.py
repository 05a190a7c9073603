"""train.py with data.buckets on a folder of images of several aspect ratios: the ldm stage trains on batches of
different sizes and the checkpoint samples at any bucket's height and width."""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from ldm.data.make_shards import make_shards
from ldm.lightning.stages import make_data
from ldm.pipeline import LatentDiffusionPipeline
from tests.integration.tiny_run import read_metrics, run_train


def test_a_bucketed_run_trains_on_several_sizes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(20, 40), (30, 30), (40, 20), (22, 44), (35, 35), (44, 22)] * 4):
        Image.new("RGB", size, (10 * i, 120, 200)).save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"a picture number {i}")
    make_shards(images, tmp_path / "shards", maxcount=6, log=None)
    run_train(tmp_path, "data=folder", "dataset=null", "stages=[vae,ldm]", "vae_stage.max_steps=2",
              "ldm_stage.max_steps=6", "ldm_stage.cache_latents=false", "data.pin_memory=false",
              "data.buckets={pixels:576,step:8,max_ratio:2.0}", run_dir=tmp_path / "run")
    metrics = read_metrics(tmp_path / "run" / "logs" / "version_1" / "metrics.csv")  # version_0: the vae stage
    losses = [m["train/loss"] for m in metrics.values() if "train/loss" in m]
    assert len(losses) >= 5 and all(math.isfinite(v) for v in losses)
    # the stage's own data config, rebuilt from the run folder, serves batches of several sizes in those steps
    cfg = OmegaConf.load(tmp_path / "run" / "ldm" / "config.yaml")
    data = make_data(cfg, cfg.ldm_stage)
    data.setup("fit")
    shapes = {tuple(batch["image"].shape[-2:]) for batch in islice(data.train_dataloader(), cfg.ldm_stage.max_steps)}
    assert len(shapes) >= 2, shapes
    pipe = LatentDiffusionPipeline.from_checkpoint(tmp_path / "run" / "ldm" / "checkpoints" / "last.ckpt")
    out = pipe(["a picture number 3"], height=16, width=32, num_inference_steps=2, output_type="tensor")
    assert out.shape == (1, 3, 16, 32)
