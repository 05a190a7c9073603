"""A temporary file beside its destination, created with the mode a plain ``open`` would give it, for writers that
rename it into place: ``tempfile.mkstemp`` creates 0600 files, so a checkpoint renamed from one would be unreadable to
the group and to other accounts that read the run folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's file-creation mask (Linux: read from /proc, without changing it; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def temporary_beside(path: Path) -> tuple[int, Path]:
    """(open descriptor, path) of a new empty file ``.NAME.*.tmp`` in ``path``'s folder, in ``plain_mode``. A writer
    that replaces the file by name (safetensors does) sets the mode again with ``os.chmod(tmp, plain_mode())``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, plain_mode())
    return fd, Path(tmp)
