"""One training per run folder: a lock file that names its holder (PID, host and SLURM job), so a second training in
the same folder is refused instead of interleaving its checkpoints and configs with the first's. A lock left by a
process that died on this host, or by an earlier run of this SLURM job (requeued, perhaps onto another node), is taken
over with a warning."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from ldm.errors import ConfigError
from ldm.lightning.slurm import slurm_job_id

LOCK_NAME = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/train.lock`` for the block. Only one process per run takes it (the
    caller decides: rank 0)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _write(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job_id(),
                       "started": time.time()}, f)
        return True

    def __enter__(self) -> RunLock:
        if not self._write():
            try:
                holder = json.loads(self.path.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host, job = holder.get("pid"), holder.get("host"), holder.get("slurm_job")
            dead = host == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
            requeued = job is not None and job == slurm_job_id()  # a SLURM job runs once at a time
            if dead or requeued:
                why = "which is no longer running (a run that was killed)" if dead else \
                    f"an earlier run of this SLURM job ({job}), which was requeued"
                warnings.warn(f"{self.path}: taking over the lock of PID {pid} on {host}, {why}", stacklevel=2)
                self.path.unlink(missing_ok=True)
                if not self._write():
                    raise ConfigError(f"{self.path}: another process took the run folder's lock just now")
            else:
                raise ConfigError(
                    f"the run folder {self.path.parent} is in use by another training (PID {pid} on {host}, per "
                    f"{self.path}). Use another folder (hydra.run.dir=...), or wait for that run; if it is dead on "
                    "another host, delete the lock file")
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
