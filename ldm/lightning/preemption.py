"""Preemption: on SIGTERM or the pre-timeout signal a run finishes its step, writes a resumable checkpoint and stops.

Lightning's own handling does not fit: its SIGTERM path saves nothing and exits 0, and its SLURM requeue saves from
inside the signal handler, in the middle of a step. Here the handler only records the signal; the ranks agree on it
at the end of a step, every rank saves the same state through the trainer, and ``stages.run`` then requeues the SLURM
job (pre-timeout signal only) and raises ``Preempted``, which ``train.py`` turns into a non-zero exit status. For the
whole run (``record_signals``), not only while a stage trains, the signals are recorded rather than fatal: a signal
between the stages (the normalisation fit, writing ``vae.ckpt``, the latent cache) stops the run before the next
stage trains, and one before the first step stops it at that step.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
        then = "the SLURM job is requeued and resumes" if requeued else "resume with resume=auto (or last)"
        done = f"after saving {checkpoint}" if checkpoint else "before the stage trained (nothing new to save)"
        super().__init__(f"stopped on {name} {done}; {then}")


class SignalRecorder:
    """Records the first of ``signals`` this process receives, instead of dying of it; the run acts on it at its
    next check (a step's end, or between two stages)."""

    def __init__(self, signals: list[int]):
        self.signals = signals
        self.received: int | None = None

    def handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def listen(self) -> dict[int, Any]:
        """Handle the signals from now on (the main thread only: elsewhere Python refuses); returns the handlers
        replaced."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self.handle) for signum in self.signals}


_RUN_RECORDER: SignalRecorder | None = None  # signal handlers are the process's: one recorder for the run


def preemption_signals(name: str | int) -> list[int]:
    """SIGTERM and the pre-timeout signal ``name``, the signals a run saves and stops on."""
    return sorted({parse_signal("SIGTERM"), parse_signal(name)})


@contextmanager
def record_signals(name: str | int) -> Iterator[SignalRecorder]:
    """Record SIGTERM and ``name`` for the duration (a whole run), then restore the handlers found."""
    global _RUN_RECORDER
    recorder = SignalRecorder(preemption_signals(name))
    previous, _RUN_RECORDER = recorder.listen(), recorder
    try:
        yield recorder
    finally:
        _RUN_RECORDER = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _requeue_and_raise(signum: int, checkpoint: str | None, pretimeout: int, requeue: bool, is_global_zero: bool,
                       barrier) -> None:
    """Requeue the SLURM job on the pre-timeout signal (rank 0, when ``requeue``), then raise ``Preempted``."""
    job = slurm_job_id()
    requeued = False
    if requeue and job is not None and signum == pretimeout:
        requeued = requeue_slurm_job(job) if is_global_zero else False
    barrier()
    raise Preempted(signum, checkpoint, requeued)


def stop_between_stages(trainer: L.Trainer, signal_name: str | int, checkpoint: str | Path | None,
                        requeue: bool) -> None:
    """Between two stages, outside ``fit``: raise ``Preempted`` (after the requeue) when any rank has recorded a
    signal since the run started. ``checkpoint``: what a resumed run continues from (``vae.ckpt``). The ranks agree
    through the process group of an earlier stage; before any, a multi-rank run leaves the signal to its first
    step's check, where they do."""
    import torch
    import torch.distributed as dist

    if _RUN_RECORDER is None:
        return
    got = _RUN_RECORDER.received or 0
    several = trainer.world_size > 1
    if several:
        if not dist.is_initialized():
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        got = int(all_ranks(torch.tensor(float(got), device=device), "max").item())
    if not got:
        return
    rank_zero_info(f"{signal.Signals(got).name} received between stages: stopping before the next stage trains")
    _requeue_and_raise(got, str(checkpoint) if checkpoint else None, parse_signal(signal_name), requeue,
                       trainer.is_global_zero, dist.barrier if several else lambda: None)


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
    and Lightning restores the previous ones when fit ends. Inside ``record_signals`` (a run of ``stages.run``) the
    run's recorder is used, so a signal received before training started stops the run at the first step. Under
    DDP the ranks agree every ``check_every_n_steps`` steps (one all-reduce), so a signal that reaches one rank
    stops all of them at the same step. On GPUs the agreed value is read two steps after the all-reduce
    (``LaggedReads``), so the training step never waits for the GPU; the ranks then stop two steps after the check.
    """

    def __init__(self, signal: str | int = "SIGUSR1", check_every_n_steps: int = 1):
        self.signals = preemption_signals(signal)
        self.pretimeout = parse_signal(signal)
        self.check_every_n_steps = check_every_n_steps
        run = _RUN_RECORDER
        self.recorder = run if run is not None and run.signals == self.signals else SignalRecorder(self.signals)
        self.stopped_by: int | None = None  # the signal the ranks stopped on (set on every rank)
        self.checkpoint: str | None = None
        self._agreed: LaggedReads | None = None  # under DDP: the ranks' agreed signal, read on the host

    @property
    def received(self) -> int | None:
        """The first signal this process got."""
        return self.recorder.received

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.recorder.listen()  # Lightning restores the handlers it found when fit ends

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
        elif validation_follows(trainer):
            self._drain(trainer)  # a signal still being agreed on: save before a validation delays the checkpoint
        if self.stopped_by is not None and not 0 < trainer.max_steps <= step:
            # Lightning validates a stopping run at once: here off its schedule, or before a checkpoint that a resumed
            # run validates again (ResumedValidation); its loss and best checkpoint would be logged and kept twice.
            # The last step's validation stays: the run has finished, no resumed run will measure it
            trainer.fit_loop.epoch_loop._skip_next_val = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drain(trainer)  # the last step's (the module stops the run after the callbacks' batch-end hooks)

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
        _requeue_and_raise(self.stopped_by, self.checkpoint, self.pretimeout, requeue, trainer.is_global_zero,
                           trainer.strategy.barrier)


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates after the training batch that is ending (its own test, on its schedule)."""
    return trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


def preempted(trainer: L.Trainer) -> bool:
    """Whether a ``PreemptionCheckpoint`` stopped this trainer (end-of-training work, such as grids, is skipped)."""
    return any(isinstance(c, PreemptionCheckpoint) and c.stopped_by is not None for c in trainer.callbacks)
