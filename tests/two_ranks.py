"""Two gloo ranks in forked processes: tests of code that runs under torch.distributed, without a launcher."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def on_two_ranks(target: Callable[..., Any], store: Path, *args: Any, timeout: float = 60) -> dict[int, Any]:
    """``target(rank, *args)`` on ranks 0 and 1 of a gloo group (a file store at ``store``); each rank's result.
    The processes are forked, so they inherit the test process's imports instead of starting up again; ``target``
    must not run a backward (autograd's threads do not survive a fork once the test process has used them)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, str(store), target, args, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failed = {rank: r for rank, r in results.items() if isinstance(r, str) and r.startswith("Traceback")}
    assert not failed, "\n".join(failed.values())
    return {rank: results[rank] for rank in (0, 1)}  # by rank, whichever finished first


def _rank(rank: int, store: str, target: Callable[..., Any], args: tuple, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        out.put((rank, target(rank, *args)))
    except BaseException:
        out.put((rank, traceback.format_exc()))
    finally:
        # Neither rank leaves before both are done: gloo can finish connecting a new group on one rank before the
        # other, and a rank that exited then would close the sockets its peer is still connecting over.
        dist.barrier()
        dist.destroy_process_group()
