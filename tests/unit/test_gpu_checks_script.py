"""bench/gpu_checks.sh's dry run: every command it would run on a GPU still starts (its script imports and its
arguments parse; train.py's overrides compose and pass the run's checks), checked on this machine by
bench/parse_only.py, which fails on a wrong flag, choice, script or override."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ["tests", "bench", "perf", "sampling", "mfu", "kernels", "cache", "quickstart", "quickstart_fp32"]


def test_every_gpu_check_command_starts(tmp_path):
    env = {**os.environ, "GPU_CHECKS_DRY_RUN": "1", "OUT": str(tmp_path)}
    out = subprocess.run(["bash", "bench/gpu_checks.sh", *CHECKS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    commands = (tmp_path / "dry_run_commands.txt").read_text().splitlines()
    ok = [line for line in out.stdout.splitlines() if line.startswith("ok   python3")]
    assert len(ok) == len(commands) == 30, out.stdout[-4000:]
    scripts = {c.split()[1] if c.split()[1] != "-m" else c.split()[2] for c in commands}
    assert scripts == {"bench/unet.py", "bench/mfu.py", "bench/pipeline.py", "bench/kernel_families.py",
                       "bench/vae_encode.py", "train.py", "ldm.eval.shapes"}
    assert "tests collected" in out.stdout  # the CUDA tests are collected, not run


def test_a_command_that_would_not_start_fails_the_dry_run(tmp_path):
    bad = ["python3 bench/unet.py --config sd15 --no-such-flag", "python3 bench/mfu.py --config nope",
           "python3 bench/missing.py", "python3 train.py trainer=nope", "python3 train.py ldm_stage.max_steps=-3",
           "python3 -m ldm.eval.shapes --n 5", "python3 -m"]
    good = "python3 bench/vae_encode.py --config kl_f8 --size 512 --batch 16 --device cuda"
    (tmp_path / "commands.txt").write_text("\n".join([*bad, good]) + "\n")
    out = subprocess.run([sys.executable, "bench/parse_only.py", str(tmp_path / "commands.txt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert [line[5:] for line in lines if line.startswith("FAIL ")] == bad
    assert f"ok   {good}" in lines
    assert any("unrecognized arguments: --no-such-flag" in line for line in lines)
    assert any("ldm_stage.max_steps must be >= 1" in line for line in lines)
    assert any("required: ckpt" in line for line in lines)
    assert "     no script or module named" in lines
