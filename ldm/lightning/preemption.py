"""Preemption: on SIGTERM or the pre-timeout signal a run finishes its step, writes a resumable checkpoint and stops.

Lightning's own handling does not fit: its SIGTERM path saves nothing and exits 0, and its SLURM requeue saves from
inside the signal handler, in the middle of a step. Here the handler only records the signal; the ranks agree on it
at the end of a step, every rank saves the same state through the trainer, and ``stages.run`` then requeues the SLURM
job (pre-timeout signal only) and raises ``Preempted``, which ``train.py`` turns into a non-zero exit status.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ldm.lightning.host_reads import LaggedReads
from ldm.lightning.settings import parse_signal
from ldm.lightning.sharding import all_ranks
from ldm.lightning.slurm import slurm_job_id


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped on request, with its state saved)
    """The run stopped on a signal after saving ``checkpoint``; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: str | None, requeued: bool):
        self.signum, self.checkpoint, self.requeued = signum, checkpoint, requeued
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        then = "the SLURM job is requeued and resumes from it" if requeued else "resume with resume=auto (or last)"
        super().__init__(f"stopped on {name} after saving {checkpoint}; {then}")


def requeue_slurm_job(job: str) -> bool:
    """``scontrol requeue JOB``; False (with a warning naming the command's output) when it fails."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"scontrol requeue {job} did not run ({err}); resubmit the job to resume")
        return False
    if proc.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({proc.returncode}): {proc.stderr.strip()[:300]}; resubmit the "
                       "job to resume")
        return False
    rank_zero_info(f"requeued SLURM job {job}")
    return True


class PreemptionCheckpoint(L.Callback):
    """Stops training at the end of the step in which SIGTERM or ``signal`` arrived, after saving ``last.ckpt``.

    The handlers are installed when training starts (after Lightning's own, which they replace for these signals)
    and Lightning restores the previous ones when fit ends. Under DDP the ranks agree every ``check_every_n_steps``
    steps (one all-reduce), so a signal that reaches one rank stops all of them at the same step. On GPUs the
    agreed value is read two steps after the all-reduce (``LaggedReads``), so the training step never waits for the
    GPU; the ranks then stop two steps after the check.
    """

    def __init__(self, signal: str | int = "SIGUSR1", check_every_n_steps: int = 1):
        self.signals = sorted({parse_signal("SIGTERM"), parse_signal(signal)})
        self.pretimeout = parse_signal(signal)
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None  # the first signal this process got
        self.stopped_by: int | None = None  # the signal the ranks stopped on (set on every rank)
        self.checkpoint: str | None = None
        self._agreed: LaggedReads | None = None  # under DDP: the ranks' agreed signal, read on the host

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.stopped_by is not None or trainer.fit_loop._should_accumulate():
            return  # within a gradient-accumulation window a save would lose the gradients accumulated so far
        step = trainer.global_step
        got = 0
        if trainer.world_size == 1:
            if step % self.check_every_n_steps == 0:
                got = self.received or 0
        else:  # the largest signal number any rank got (0: none), the same on every rank
            if self._agreed is None:  # GPU: read two steps late, so the host never waits for the GPU's queue
                self._agreed = LaggedReads(2 if pl_module.device.type == "cuda" else 0)
            if step % self.check_every_n_steps == 0:
                import torch

                local = torch.tensor(float(self.received or 0)).to(pl_module.device, non_blocking=True)
                self._agreed.push(step, all_ranks(local, "max"))
            got = int(max((value for _, value in self._agreed.due(step)), default=0))
        if got:
            self._save_and_stop(trainer, got)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drain(trainer)  # a signal still being agreed on: save before a validation delays the checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drain(trainer)  # a signal agreed on in the last steps still stops the run (and the stages after it)

    def _drain(self, trainer: L.Trainer) -> None:
        """Act on a signal the step-end checks have not: one still being agreed on (DDP), or, in one process, one
        that came after the last check (between checks with ``check_every_n_steps`` > 1, or during the last step's
        own end): dropped, the next stage would start and the job would not be requeued."""
        if self.stopped_by is not None:
            return
        if self._agreed is not None:
            got = int(max((value for _, value in self._agreed.drain()), default=0))
        else:
            got = (self.received or 0) if trainer.world_size == 1 else 0
        if got:
            self._save_and_stop(trainer, got)

    def _save_and_stop(self, trainer: L.Trainer, got: int) -> None:
        self.stopped_by = got
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"
        rank_zero_info(f"{signal.Signals(got).name} received: saving {path} at step {trainer.global_step} and stopping")
        for callback in trainer.checkpoint_callbacks:  # it is their last.ckpt: theirs to overwrite, not to version
            if getattr(callback, "dirpath", None) and Path(callback.dirpath) == path.parent:
                callback.last_model_path = str(path)
        trainer.save_checkpoint(path, weights_only=False)  # every rank: a collective under FSDP
        self.checkpoint = str(path)
        trainer.should_stop = True

    def stop(self, trainer: L.Trainer, requeue: bool) -> None:
        """After ``fit`` returned: nothing when no signal stopped it; otherwise requeue the SLURM job on the
        pre-timeout signal (rank 0, when ``requeue``) and raise ``Preempted`` on every rank."""
        if self.stopped_by is None:
            return
        job = slurm_job_id()
        requeued = False
        if requeue and job is not None and self.stopped_by == self.pretimeout:
            requeued = requeue_slurm_job(job) if trainer.is_global_zero else False
        trainer.strategy.barrier()
        raise Preempted(self.stopped_by, self.checkpoint, requeued)


def preempted(trainer: L.Trainer) -> bool:
    """Whether a ``PreemptionCheckpoint`` stopped this trainer (end-of-training work, such as grids, is skipped)."""
    return any(isinstance(c, PreemptionCheckpoint) and c.stopped_by is not None for c in trainer.callbacks)
