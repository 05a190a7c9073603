"""Exact mid-epoch resume through Lightning: train k steps, checkpoint, resume in a NEW process, and compare the
batches it trains on with an uninterrupted run (num_workers 0 and 2, random crop and flip on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import make_shards

ROOT = Path(__file__).resolve().parents[2]
K, M = 20, 14  # stop mid-epoch 1 (15-16 batches per epoch), continue into epoch 2


class Recorder(L.LightningModule):
    """Records each batch's keys and an image checksum (so augmentation must replay exactly too)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append([list(batch["key"]), round(float(batch["image"].double().sum()), 3)])
        return (self.w * batch["image"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(shards: str, num_workers: int, max_steps: int, ckpt_in: str | None = None, ckpt_out: str | None = None):
    dm = ShardDataModule(shards, batch_size=4, num_workers=num_workers, shuffle_buffer=8, crop="random",
                         hflip=True, image_size=28, seed=7)
    model = Recorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return model.seen


def test_resume_in_new_process(tmp_path):
    shards = tmp_path / "shards"
    make_shards("shapes", shards, maxcount=10, length=60, log=None)
    expected = {}
    for nw in (0, 2):
        expected[nw] = _fit(str(shards), nw, K + M)
        part = _fit(str(shards), nw, K, ckpt_out=str(tmp_path / f"nw{nw}.ckpt"))
        assert part == expected[nw][:K]
        state = torch.load(tmp_path / f"nw{nw}.ckpt", weights_only=False)["ShardDataModule"]
        assert (state["epoch"], state["batch"]) == (1, K - (15 if nw == 0 else 16))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "resumed.json"
    proc = subprocess.run([sys.executable, __file__, str(shards), str(tmp_path), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(out.read_text())
    for nw in (0, 2):
        assert len(resumed[str(nw)]) == M
        assert resumed[str(nw)] == expected[nw][K:], nw


if __name__ == "__main__":  # the new process: resume both runs from their checkpoints
    shards_dir, tmp, out_path = sys.argv[1:4]
    result = {nw: _fit(shards_dir, nw, K + M, ckpt_in=f"{tmp}/nw{nw}.ckpt") for nw in (0, 2)}
    Path(out_path).write_text(json.dumps(result))
