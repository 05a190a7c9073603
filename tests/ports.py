"""Free TCP ports for the tests' process groups, safe when pytest-xdist runs test files in parallel."""

from __future__ import annotations

import os
import random
import socket

# Below the kernel's ephemeral range (32768-60999 on Linux), so no bind(0) and no outgoing connection takes the port
# between the check and the process group's listen; each xdist worker draws from a block of its own (workers beyond
# the number of blocks share them, still drawing at random).
_FIRST, _BLOCK, _EPHEMERAL = 20000, 1500, 32768
_BLOCKS = (_EPHEMERAL - _FIRST) // _BLOCK


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, from this pytest worker's own block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = _FIRST + (int(worker) % _BLOCKS if worker.isdigit() else 0) * _BLOCK
    for port in random.sample(range(start, start + _BLOCK), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + _BLOCK - 1}: close what holds them")
