"""Under DDP the logged ``train/loss`` is the mean of the ranks' batch losses (one all-reduce on the written steps),
not rank 0's own batch: two CPU ranks, each step's loss recorded on both and compared with the CSV log."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.integration.tiny_run import read_metrics, train_env

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from lightning.pytorch.loggers import CSVLogger
    from ldm.lightning.sharding import ddp_strategy
    from tests.module_factory import diffusion_module
    from tests.unit.test_lightning_modules import collate, image_batches

    class Net(nn.Module):
        num_classes = None

        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.ones(3, 1, 1)), nn.Parameter(torch.zeros(3, 1, 1))

        def forward(self, x, t, context=None):
            return x * self.w + self.b

    class Record(L.Callback):
        losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    out = sys.argv[1]
    L.seed_everything(0)
    module = diffusion_module(Net(), None, None, ema_decay=None, max_steps=3,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy=ddp_strategy(), log_every_n_steps=1,
                        logger=CSVLogger(out, name="log", version=0), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        callbacks=[Record()])
    trainer.fit(module, DataLoader(image_batches(32), batch_size=4, collate_fn=collate))
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, Record.losses)
    if trainer.is_global_zero:
        with open(f"{out}/losses.json", "w") as f:
            json.dump(gathered, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads end before the interpreter does (else: abort)
    """
)


def test_the_logged_training_loss_is_the_mean_over_the_ranks(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = json.loads((tmp_path / "losses.json").read_text())
    assert len(rank0) == len(rank1) == 3 and rank0 != rank1  # the ranks train on different batches
    logged = read_metrics(tmp_path / "log" / "version_0" / "metrics.csv")
    means = [(a + b) / 2 for a, b in zip(rank0, rank1, strict=True)]
    assert [logged[step]["train/loss"] for step in range(3)] == pytest.approx(means, abs=1e-6)
