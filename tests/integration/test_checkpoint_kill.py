"""A run SIGKILLed in the middle of a checkpoint write keeps the previous checkpoint whole and resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import pytest
import torch

from ldm.checkpoint import atomic_torch_save
from tests.integration.tiny_run import ROOT, read_metrics, run_train, train_cmd, train_env

# train.py whose torch.save, on the second save at step 4 (the ldm stage's last.ckpt, after step000004.ckpt),
# writes half the bytes, fsyncs, says so in a marker file and hangs: the test SIGKILLs it there.
HANGING_SAVE = textwrap.dedent(
    f"""
    import io, os, time
    import hydra
    import torch
    from ldm.lightning import stages

    real_save, saves_at_4 = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "ldm" in obj and obj.get("global_step") == 4:
            saves_at_4.append(1)
            if len(saves_at_4) == 2:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                open(os.environ["MARKER"], "w").close()
                time.sleep(600)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    if __name__ == "__main__":
        hydra.main(config_path={str(ROOT / "conf")!r}, config_name="train", version_base="1.3")(stages.run)()
    """
)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resume_works(tmp_path):
    script, marker, run = tmp_path / "hanging_save.py", tmp_path / "writing", tmp_path / "run"
    script.write_text(HANGING_SAVE)
    overrides = ["vae_stage.max_steps=2", "ldm_stage.max_steps=6", "callbacks.ldm.checkpoint.every_n_train_steps=2"]
    cmd = train_cmd(run, tmp_path / "shards", *overrides)
    cmd[1] = str(script)  # the same command line, through the hanging script
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=train_env(MARKER=str(marker)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), f"the save never started (rc {proc.poll()}):\n{proc.stdout.read()[-5000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()

    ckpts = run / "ldm" / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".last.ckpt.") and p.name.endswith(".tmp")]
    assert len(partial) == 1  # the half-written file lies under a temporary name ...
    with pytest.raises(Exception):  # noqa: B017 (whatever torch raises for a truncated zip)
        torch.load(partial[0], weights_only=False)
    previous = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)  # ... last.ckpt is whole
    assert previous["global_step"] == 2

    # A new process resumes from it, in the same run directory, to the end; its saves clear the stale temporary.
    run_train(tmp_path, *overrides, f"resume={ckpts / 'last.ckpt'}", run_dir=run)
    final = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6 and int(final["state_dict"]["ema.num_updates"]) == 6
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())
    # version_0: vae, 1: the ldm stage, continued: the killed process's rows before the checkpoint, then the resumed
    # run's (its rows after the checkpoint dropped, none replayed)
    rows = read_metrics(run / "logs" / "version_1" / "metrics.csv")
    assert sorted(rows) == [0, 1, 2, 3, 4, 5] and not (run / "logs" / "version_2").exists()

def test_atomic_save_failing_mid_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"v": 1}, path)
    stale = tmp_path / ".x.ckpt.abc123.tmp"  # what a SIGKILLed writer leaves
    stale.write_bytes(b"partial")

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.ckpt.abc123.tmp", "x.ckpt"]  # its own tmp removed
    atomic_torch_save({"v": 3}, path)
    assert torch.load(path, weights_only=False) == {"v": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]  # the stale temporary cleared too



def test_a_full_disk_leaves_no_empty_or_partial_text_file(tmp_path, monkeypatch):
    import errno

    from ldm.checkpoint import atomic_write_text

    path = tmp_path / "config.yaml"
    real_fsync = os.fsync

    def full_disk(fd):  # the data does not fit: the write fails at its flush to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "seed: 0\n")
    assert list(tmp_path.iterdir()) == []  # no zero-byte config.yaml, no temporary
    monkeypatch.setattr(os, "fsync", real_fsync)
    atomic_write_text(path, "seed: 0\n")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(path, "seed: 1\n")
    assert path.read_text() == "seed: 0\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
