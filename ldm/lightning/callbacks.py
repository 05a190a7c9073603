"""Training callbacks: throughput (images/s, MFU where countable) and a fixed-prompt sample grid."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from PIL import Image

from ldm.pipeline import to_pil


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images into one grid image."""
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


class Throughput(L.Callback):
    """Logs images/s per step and, given the model FLOPs of one training step and the device's peak, MFU."""

    def __init__(self, flops_per_step: float | None = None, peak_flops: float | None = None):
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - self._t0
        n = len(batch["caption"]) if "caption" in batch else next(iter(batch.values())).shape[0]
        pl_module.log("perf/images_per_s", n * trainer.world_size / dt, batch_size=n)
        if self.flops_per_step and self.peak_flops:
            pl_module.log("perf/mfu", self.flops_per_step / dt / self.peak_flops, batch_size=n)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end) sample fixed prompts with fixed seeds; save and log the grid."""

    def __init__(self, prompts: list[str], every_n_steps: int, out_dir: str | Path, seed: int = 0):
        self.prompts, self.every, self.out_dir, self.seed = list(prompts), every_n_steps, Path(out_dir), seed

    def _sample(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        g = torch.Generator().manual_seed(self.seed)
        images = to_pil(pl_module.generate(self.prompts, generator=g))
        grid = make_grid(images, cols=4)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"samples_step{trainer.global_step:06d}.png"
        grid.save(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=trainer.global_step,
                                 caption=[" | ".join(self.prompts)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._sample(trainer, pl_module)
