"""One training per run folder: a lock file that names its holder (PID, host and SLURM job), so a second training in
the same folder is refused instead of interleaving its checkpoints and configs with the first's. A lock left by a
process that died on this host (a former process with this one's PID too, as after a container restart), by an
earlier run of this SLURM job (requeued, perhaps onto another node; not a live step of the same job on this host),
or left empty by a writer killed mid-write, is taken over with a warning, by one process only."""

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
EMPTY_LOCK_GRACE_S = 10.0  # an unreadable lock older than this was left by a writer killed mid-write (older ldm)
_LOADED = time.time()  # no lock this process writes is older: one naming its PID but older is a former process's


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
        self.record: dict = {}

    def _write(self) -> bool:
        """Create the lock with its content in one step (a hard link of a written temporary: never an empty lock);
        False when one exists."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job_id(),
                       "started": time.time()}
        tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.record))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _read(self, path: Path) -> dict:
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __enter__(self) -> RunLock:
        if not self._write():
            holder = self._read(self.path)
            pid, host, job = holder.get("pid"), holder.get("host"), holder.get("slurm_job")
            here = host == socket.gethostname() and isinstance(pid, int)
            started = holder.get("started")
            former = here and pid == os.getpid() and isinstance(started, (int, float)) and started < _LOADED
            dead = here and (former or (pid != os.getpid() and not _alive(pid)))
            # a SLURM job runs once at a time, but its steps may run at once: a live holder here is not a former run
            live_here = here and not dead and (pid == os.getpid() or _alive(pid))
            requeued = job is not None and job == slurm_job_id() and not live_here
            try:
                unreadable = not holder and time.time() - self.path.stat().st_mtime > EMPTY_LOCK_GRACE_S
            except FileNotFoundError:
                unreadable = False
            if dead or requeued or unreadable:
                why = ("which is no longer running (a run that was killed)" if dead else
                       f"an earlier run of this SLURM job ({job}), which was requeued" if requeued else
                       "which is empty or unreadable (its writer was killed)")
                warnings.warn(f"{self.path}: taking over the lock of PID {pid} on {host}, {why}", stacklevel=2)
                # one taker: the rename moves the stale lock for the first process only, and a lock written since
                # (another taker's) is put back rather than removed
                aside = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    aside = None
                if aside is not None and self._read(aside) != holder:
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    aside.unlink(missing_ok=True)
                    raise ConfigError(f"{self.path}: another process took the run folder's lock just now")
                if aside is not None:
                    aside.unlink(missing_ok=True)
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
            if self._read(self.path) == self.record:  # ours still: a lock another process took over stays
                self.path.unlink(missing_ok=True)
            self.held = False
