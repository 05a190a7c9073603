"""`python train.py -m`: a two-job sweep gives each job its own directory with checkpoints and the resolved config."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.integration.tiny_run import read_metrics, run_train


def test_two_job_sweep_writes_two_run_directories(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(tmp_path, "optimizer.lr=1e-3,2e-3", "vae_stage.max_steps=2", "ldm_stage.max_steps=2",
              f"hydra.sweep.dir={sweep}", multirun=True)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, (1e-3, 2e-3), strict=True):
        assert (job / ".hydra" / "overrides.yaml").is_file()
        assert (job / "vae" / "vae.ckpt").is_file() and (job / "vae" / "config.yaml").is_file()
        config = yaml.safe_load((job / "ldm" / "config.yaml").read_text())
        assert config["optimizer"]["lr"] == lr and config["out_dir"] == str(job)  # resolved, per job
        ckpt = torch.load(job / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 2 and ckpt["ldm"]["config"]["optimizer"]["lr"] == lr
        # each job logged its own curves, at its own learning rate (warm-up done at step 1)
        logs = sorted((job / "logs").glob("version_*/metrics.csv"))
        assert len(logs) == 2  # the vae stage's and the ldm stage's
        assert read_metrics(logs[-1])[1]["train/lr"] == pytest.approx(lr)
