"""Helpers for the train.py integration tests: a very small model and data configuration, and a subprocess runner."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

# 16 px shapes, a f=4 autoencoder and a UNet of 32 channels and a one-layer text tower: a step is a few ms.
TINY_MODELS = [
    "data.image_size=16", "autoencoder.ch_mult=[1,1,1]", "unet.model_channels=32", "unet.num_heads=2",
    "text_encoder.width=32", "text_encoder.layers=1", "text_encoder.heads=2", "text_encoder.context_length=12",
    "sampling.num_inference_steps=2", "callbacks.ldm.samples.every_n_steps=0",
    "callbacks.ldm.samples.prompts=[a red circle in the top left,a blue square in the center]",
    "vae_stage.batch_size=4", "ldm_stage.batch_size=4", "ldm_stage.warmup_steps=2",
    "dataset.length=48", "dataset.maxcount=8", "logger=csv", "trainer.log_every_n_steps=1",
]


def train_cmd(run_dir: Path, shards: Path, *overrides: str, multirun: bool = False) -> list[str]:
    """The train.py command line for a tiny run writing to ``run_dir`` (or, with ``multirun``, sweeping)."""
    where = [] if multirun else [f"hydra.run.dir={run_dir}"]
    return [sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []), *where,
            f"data.train_shards={shards}", *TINY_MODELS, *overrides]


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a train.py subprocess: this checkout importable, wandb offline, few threads, and a
    MASTER_PORT of this test worker's own for the runs that start a process group."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keeps packages put there
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(free_port()), **extra}


def run_train(tmp: Path, *overrides: str, run_dir: Path | None = None, multirun: bool = False, timeout: int = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run train.py in ``tmp`` (shards in tmp/shards, written on first use); raise with its output if it fails."""
    cmd = train_cmd(run_dir or tmp / "run", tmp / "shards", *overrides, multirun=multirun)
    proc = subprocess.run(cmd, cwd=tmp, env=env or train_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """A CSVLogger metrics.csv as {step: {metric: value}} (rows of one step merged, empty cells dropped)."""
    out: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            out.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out
