"""`python train.py -m`: a two-job sweep gives each job its own directory with checkpoints and the resolved config."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

from tests.integration.tiny_run import read_metrics, run_train, train_cmd, train_env


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


def test_a_job_with_a_wrong_value_fails_alone_and_the_sweep_goes_on(tmp_path):
    """train.py exited (status 2) on a wrong input, which ended the whole sweep at its first bad job."""
    sweep = tmp_path / "sweep"
    cmd = train_cmd(tmp_path / "run", tmp_path / "shards", "optimizer.lr=-1,1e-3", "vae_stage.max_steps=1",
                    "ldm_stage.max_steps=1", f"hydra.sweep.dir={sweep}", multirun=True)
    proc = subprocess.run(cmd, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "error: optimizer.lr must be > 0.0, got -1" in proc.stderr  # the sweep failed
    assert not list((sweep / "0").rglob("*.ckpt"))  # refused before any work
    assert (sweep / "1" / "ldm" / "checkpoints" / "last.ckpt").is_file()  # the next job ran
