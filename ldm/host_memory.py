"""Keep freed host memory in the process for reuse, instead of handing it back to the OS after every step.

glibc serves blocks above its mmap threshold (128 KiB, raised as large blocks are freed) with fresh mappings and
trims the top of its heap once enough is free there. A CPU training step allocates and frees the same activations
every step, so each step then takes thousands of page faults and has the kernel zero the same memory again (the
quickstart's LDM step: 13,000-29,000 minor faults and 50-90 ms of system time). With the thresholds raised, the
freed blocks are reused: no faults after the first steps. This is what jemalloc or tcmalloc under LD_PRELOAD give a
PyTorch CPU process; ``mallopt`` gets it without a library or a relaunch. No other platform is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: blocks below it come from the heap
TRIM_THRESHOLD = 1 << 30  # the heap's top is returned to the OS only past 1 GiB free
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time (fewer brk calls)


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the workers it forks later). Returns whether
    they were set: False off Linux or without glibc (musl, for instance), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
