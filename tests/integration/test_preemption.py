"""Preemption: SIGTERM or the pre-timeout signal ends a run at a step boundary with its state saved and a non-zero
status; under SLURM the job requeues itself, and the requeued command (no resume flag) continues the loss curve of an
uninterrupted run step for step, on one process and on two DDP ranks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldm.data.make_shards import make_shards
from tests.integration.test_train_resume import assert_same_curve
from tests.integration.tiny_run import ROOT, TINY_MODELS, read_metrics, run_train, train_env
from tests.ports import free_port

N = 8  # ldm steps in all
LDM = ["stages=[ldm]", f"ldm_stage.max_steps={N}", "callbacks.ldm.checkpoint.every_n_train_steps=100",
       "ldm_stage.ema_decay=0.9", "ldm_stage.lr_schedule=cosine", "ldm_stage.cache_latents=false"]
KEYS = ("train/loss", "train/lr", "train/grad_norm")

# train.py plus a callback that sends this process SIGNAL when step AT starts on rank RANK (as a scheduler would,
# between two steps' work): the run must finish that step, so its checkpoint holds AT + 1 steps.
SIGNALLING = textwrap.dedent(
    f"""
    import os, signal
    import hydra
    import lightning as L
    from ldm.errors import ConfigError
    from ldm.lightning import stages
    from ldm.lightning.preemption import Preempted

    def send():
        os.kill(os.getpid(), getattr(signal, os.environ["SEND_SIGNAL"]))

    class Send(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            at, rank = os.environ.get("SEND_AT"), os.environ.get("SEND_RANK", "0")
            if at and at.isdigit() and trainer.global_step == int(at) and trainer.global_rank == int(rank):
                send()

        def on_fit_start(self, trainer, pl_module):  # before Lightning installs its own handlers
            if os.environ.get("SEND_AT") == "fit_start" and trainer.default_root_dir.endswith("ldm"):
                send()

    # SEND_IN=NAME: the signal comes as stages.NAME is called (between the stages) on rank SEND_RANK
    if os.environ.get("SEND_IN"):
        original = getattr(stages, os.environ["SEND_IN"])

        def sending(*args, **kwargs):
            if os.environ.get("SLURM_PROCID", "0") == os.environ.get("SEND_RANK", "0"):
                send()
            return original(*args, **kwargs)

        setattr(stages, os.environ["SEND_IN"], sending)

    make_trainer = stages.make_trainer

    def with_sender(cfg, stage_dir, max_steps, callbacks, logger, manual=False):
        return make_trainer(cfg, stage_dir, max_steps, [*callbacks, Send()], logger, manual)

    stages.make_trainer = with_sender

    def main(cfg):
        try:
            stages.run(cfg)
        except Preempted as stop:
            raise SystemExit(stop.exit_code)

    if __name__ == "__main__":
        hydra.main(config_path={str(ROOT / "conf")!r}, config_name="train", version_base="1.3")(main)()
    """
)


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("preempt")
    run_train(tmp, "stages=[vae]", "vae_stage.max_steps=2", run_dir=tmp / "vae")
    return tmp / "vae" / "vae" / "vae.ckpt"


def _cmd(script: Path, run: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, str(script), f"hydra.run.dir={run}", f"data.train_shards={shards}", *TINY_MODELS, *LDM,
            *extra]


def test_sigterm_saves_the_step_exits_143_and_resume_auto_continues_the_same_logger_run(vae_ckpt, tmp_path):
    script = tmp_path / "signalling.py"
    script.write_text(SIGNALLING)
    shards = vae_ckpt.parents[2] / "shards"
    full, cut = tmp_path / "full", tmp_path / "cut"
    base = [f"vae_ckpt={vae_ckpt}"]
    ran = subprocess.run(_cmd(script, full, shards, *base), cwd=tmp_path, env=train_env(), capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-4000:]

    stopped = subprocess.run(_cmd(script, cut, shards, *base), cwd=tmp_path, capture_output=True, text=True,
                             env=train_env(SEND_AT="3", SEND_SIGNAL="SIGTERM"), timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    last = cut / "ldm" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4  # step 3 was finished
    assert not (cut / "ldm" / "samples").exists() or not any((cut / "ldm" / "samples").iterdir())  # no end grid
    assert not (cut / "train.lock").exists()
    log = (cut / "signalling.log").read_text()
    assert "SIGTERM received: saving" in log and "ldm stage" in log  # the run's log file holds its lines

    # The same command with resume=auto continues in the folder, in the same CSV logger version.
    again = subprocess.run(_cmd(script, cut, shards, *base, "resume=auto"), cwd=tmp_path, env=train_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {last} at step 4" in again.stderr + again.stdout
    a = read_metrics(full / "logs" / "version_0" / "metrics.csv")
    b = read_metrics(cut / "logs" / "version_0" / "metrics.csv")
    assert not (cut / "logs" / "version_1").exists()
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # overwritten, not versioned
    assert_same_curve(a, b, range(N), KEYS)


def _fake_slurm(tmp: Path, rank: int, **extra: str) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp / 'scontrol.calls'}\n")
    scontrol.chmod(0o755)
    return train_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="ldm-test",
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
        SLURM_NODEID="0", SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(extra.pop("port")),
        **extra)


def _srun(cmd: list[str], tmp: Path, port: int, **extra: str) -> list[subprocess.CompletedProcess]:
    """Both tasks of a fake 2-task SLURM job step, as srun would start them."""
    procs = [subprocess.Popen(cmd, cwd=tmp, env=_fake_slurm(tmp, rank, port=port, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=400)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:  # a rank that hangs must not outlive the test, holding the port and a core
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_slurm_pretimeout_signal_on_one_rank_requeues_and_the_requeued_job_continues_exactly(vae_ckpt, tmp_path):
    script = tmp_path / "signalling.py"
    script.write_text(SIGNALLING)
    shards = vae_ckpt.parents[2] / "shards"
    full, job = tmp_path / "full", tmp_path / "job"
    cmd = [*_cmd(script, job, shards, f"vae_ckpt={vae_ckpt}"), "trainer=ddp_cpu", "trainer.devices=2"]
    ref = [*_cmd(script, full, shards, f"vae_ckpt={vae_ckpt}"), "trainer=ddp_cpu", "trainer.devices=2"]
    for p in _srun(ref, tmp_path, free_port()):
        assert p.returncode == 0, p.stderr[-4000:]
    assert not (tmp_path / "scontrol.calls").exists()

    # SIGUSR1 (the pre-timeout signal) reaches rank 1 only, at step 3: both ranks stop after it, requeue once.
    stopped = _srun(cmd, tmp_path, free_port(), SEND_AT="3", SEND_SIGNAL="SIGUSR1", SEND_RANK="1")
    assert [p.returncode for p in stopped] == [128 + signal.SIGUSR1] * 2, stopped[0].stderr[-4000:]
    assert (tmp_path / "scontrol.calls").read_text().split("\n")[:-1] == ["requeue 4242"]
    last = job / "ldm" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4

    # The requeued job runs the same command, with no resume flag: resume=auto under SLURM.
    for p in _srun(cmd, tmp_path, free_port()):
        assert p.returncode == 0, p.stderr[-4000:]
    a = read_metrics(full / "logs" / "version_0" / "metrics.csv")
    b = read_metrics(job / "logs" / "version_0" / "metrics.csv")
    assert_same_curve(a, b, range(N), KEYS)
    end_a = torch.load(full / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    end_b = torch.load(last, map_location="cpu", weights_only=False)
    assert end_a["global_step"] == end_b["global_step"] == N
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    for k, v in end_a["state_dict"].items():
        torch.testing.assert_close(end_b["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_a_signal_between_the_stages_stops_before_the_ldm_stage_and_resume_trains_the_same_model(tmp_path):
    """The signal comes while the vae stage writes vae.ckpt (after its fit, whose handlers are gone): vae.ckpt is
    written, the ldm stage never starts, and resume=auto trains the ldm stage of the uninterrupted run."""
    script = tmp_path / "signalling.py"
    script.write_text(SIGNALLING)
    shards = tmp_path / "shards"
    stages = ["stages=[vae,ldm]", "vae_stage.max_steps=2", "ldm_stage.max_steps=4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ran = subprocess.run(_cmd(script, full, shards, *stages), cwd=tmp_path, env=train_env(), capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-4000:]

    stopped = subprocess.run(_cmd(script, cut, shards, *stages), cwd=tmp_path, capture_output=True, text=True,
                             env=train_env(SEND_IN="save_autoencoder", SEND_SIGNAL="SIGTERM"), timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]  # not killed (-15)
    assert (cut / "vae" / "vae.ckpt").is_file() and not (cut / "ldm").exists()
    assert "SIGTERM received between stages" in stopped.stderr
    assert not (cut / "train.lock").exists()

    again = subprocess.run(_cmd(script, cut, shards, *stages, "resume=auto"), cwd=tmp_path, env=train_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "the vae stage finished at step 2; the ldm stage starts from" in again.stderr + again.stdout
    a = read_metrics(full / "logs" / "version_1" / "metrics.csv")
    b = read_metrics(cut / "logs" / "version_1" / "metrics.csv")
    assert_same_curve(a, b, range(4), KEYS)


def test_a_signal_while_the_latents_are_cached_stops_before_training_and_requeues(vae_ckpt, tmp_path):
    """The pre-timeout signal during the latent cache of a one-task SLURM job: the job is requeued, no ldm
    checkpoint or logger run is started, and the requeued command trains the stage."""
    script = tmp_path / "signalling.py"
    script.write_text(SIGNALLING)
    shards = vae_ckpt.parents[2] / "shards"
    job = tmp_path / "job"
    cmd = [*_cmd(script, job, shards, f"vae_ckpt={vae_ckpt}"), "ldm_stage.cache_latents=true"]
    env = {**_fake_slurm(tmp_path, 0, port=free_port()), "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"}
    stopped = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**env, "SEND_IN": "cache_for_vae", "SEND_SIGNAL": "SIGUSR1"})
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-4000:]
    assert (tmp_path / "scontrol.calls").read_text().split("\n")[:-1] == ["requeue 4242"]
    assert "requeued SLURM job 4242" in stopped.stderr + stopped.stdout
    assert not (job / "ldm" / "checkpoints").exists() and not (job / "logs").exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    last = torch.load(job / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == N
    assert sorted(p.name for p in (job / "logs").iterdir()) == ["version_0"]


def test_a_signal_before_the_first_step_stops_the_run_at_that_step(vae_ckpt, tmp_path):
    """SIGTERM as fit starts, before any handler of Lightning's or the stage's is installed: the run's own
    recorder keeps it, and the stage saves and stops at its first step."""
    script = tmp_path / "signalling.py"
    script.write_text(SIGNALLING)
    shards = vae_ckpt.parents[2] / "shards"
    run = tmp_path / "run"
    stopped = subprocess.run(_cmd(script, run, shards, f"vae_ckpt={vae_ckpt}"), cwd=tmp_path, capture_output=True,
                             text=True, env=train_env(SEND_AT="fit_start", SEND_SIGNAL="SIGTERM"), timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    last = run / "ldm" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1


def test_a_signal_between_the_stages_on_one_rank_stops_both_ranks(vae_ckpt, tmp_path):
    """Two DDP ranks: the pre-timeout signal reaches rank 1 alone as the ldm stage builds its parts, after the vae
    stage. The ranks agree through the vae stage's process group: both stop with 138, the job is requeued once,
    and the requeued job trains the ldm stage."""
    script = tmp_path / "signalling.py"
    script.write_text(SIGNALLING)
    job = tmp_path / "job"
    cmd = [*_cmd(script, job, vae_ckpt.parents[2] / "shards", "stages=[vae,ldm]", "vae_stage.max_steps=2",
                 "ldm_stage.max_steps=4"), "trainer=ddp_cpu", "trainer.devices=2"]
    stopped = _srun(cmd, tmp_path, free_port(), SEND_IN="build_first_stage", SEND_SIGNAL="SIGUSR1", SEND_RANK="1")
    assert [p.returncode for p in stopped] == [128 + signal.SIGUSR1] * 2, stopped[0].stderr[-4000:]
    assert (tmp_path / "scontrol.calls").read_text().split("\n")[:-1] == ["requeue 4242"]
    assert (job / "vae" / "vae.ckpt").is_file() and not (job / "ldm" / "checkpoints").exists()

    for p in _srun(cmd, tmp_path, free_port()):
        assert p.returncode == 0, p.stderr[-4000:]
    last = torch.load(job / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4


def _validation_record(run: Path) -> tuple[list[str], str, float, list[tuple[int, float]]]:
    """A run's best checkpoint files, best.json's checkpoint name and score, and its logged (step, val/loss) rows."""
    folder = run / "ldm" / "checkpoints"
    best = json.loads((folder / "best.json").read_text())
    with open(run / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), round(float(r["val/loss"]), 6)) for r in csv.DictReader(f) if r.get("val/loss")]
    return sorted(p.name for p in folder.glob("best-step*.ckpt")), Path(best["checkpoint"]).name, best["score"], rows


def test_a_resumed_run_validates_the_step_its_checkpoint_was_written_before(vae_ckpt, tmp_path):
    """step4.ckpt and last.ckpt are written at the end of step 4's batch, before step 4's validation. A run killed
    after that validation (which may have kept best-step000004.ckpt), or stopped by SIGTERM at step 4 or 5, and
    resumed from them ends with the uninterrupted run's best checkpoint, best.json, validation rows (each once, none
    off the schedule) and weights: the resumed run validates step 4 itself; a stopped run does not validate."""
    script = tmp_path / "signalling.py"
    script.write_text(SIGNALLING)
    shards = vae_ckpt.parents[2] / "shards"
    make_shards("shapes", tmp_path / "val", maxcount=3, length=7, size=16, seed=5, log=None)
    base = [f"vae_ckpt={vae_ckpt}", f"data.val_shards={tmp_path / 'val'}", "ldm_stage.val_every_n_steps=2"]
    cmd = [c if not c.startswith("callbacks.ldm.checkpoint.every_n_train_steps=") else
           "callbacks.ldm.checkpoint.every_n_train_steps=2" for c in _cmd(script, tmp_path / "full", shards, *base)]

    def run(folder: str, *extra: str, **env: str) -> subprocess.CompletedProcess:
        where = [c if not c.startswith("hydra.run.dir=") else f"hydra.run.dir={tmp_path / folder}" for c in cmd]
        return subprocess.run([*where, *extra], cwd=tmp_path, env=train_env(**env), capture_output=True, text=True,
                              timeout=300)

    assert run("full").returncode == 0
    full = _validation_record(tmp_path / "full")
    assert [s for s, _ in full[3]] == [1, 3, 5, 7]  # after steps 2, 4, 6 and 8
    weights = torch.load(tmp_path / "full" / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)["state_dict"]
    for name, at, sig, status in (("killed", "4", "SIGKILL", -signal.SIGKILL), ("term4", "3", "SIGTERM", 143),
                                  ("term5", "4", "SIGTERM", 143)):
        stopped = run(name, SEND_AT=at, SEND_SIGNAL=sig)
        assert stopped.returncode == status, stopped.stderr[-3000:]
        again = run(name, "resume=last")
        assert again.returncode == 0, again.stderr[-3000:]
        resumed = _validation_record(tmp_path / name)
        assert resumed[:2] == full[:2] and resumed[3] == full[3], (name, resumed, full)
        assert resumed[2] == pytest.approx(full[2], rel=1e-6)
        end = torch.load(tmp_path / name / "ldm" / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)["state_dict"]
        assert all(torch.equal(end[k], weights[k]) for k in weights), name  # the training is the uninterrupted one
