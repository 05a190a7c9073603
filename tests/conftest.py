"""Each test starts from the same process state, whatever ran before it in this process (test order is not fixed:
pytest-xdist hands files to workers in any order)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker takes its share of the cores (torch's threads and its subprocesses'), so the
    workers do not oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """Undo what a test's in-process Trainer leaves behind: the default process group, and the variables Lightning
    writes to os.environ (MASTER_PORT, LOCAL_RANK, PL_GLOBAL_SEED, ...), which train.py subprocesses would inherit."""
    env = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)
