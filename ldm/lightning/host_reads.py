"""Reading training-step values on the host a few steps late, so that the host never waits for the GPU's queue.

A ``.item()`` (or ``bool``, ``int``, ``float``) of a GPU tensor makes the host wait until the GPU has run every kernel
queued so far; during that wait no new work is queued, so the GPU idles at the start of the next step. Reading a
value two steps after it was computed lets the GPU run the steps in between while the host queues more work. torch
and Lightning offer no such deferred read, hence this small class.
"""

from __future__ import annotations

from collections import deque

import torch


class LaggedReads:
    """Scalars pushed at a training step and read back on the host ``lag`` steps later.

    On a GPU a push copies the value into pinned host memory without blocking and records an event behind the copy;
    ``due(step)`` waits on that event only, which by then has almost always passed. Every rank pushes and reads at
    the same steps, so decisions taken on the values (stop, skip) agree across ranks. On the CPU the values are read
    at the same steps, with nothing to wait for.
    """

    def __init__(self, lag: int = 2):
        if lag < 0:
            raise ValueError(f"lag must be >= 0 steps, got {lag}")
        self.lag = lag
        self._pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    def push(self, step: int, value: torch.Tensor) -> None:
        """Queue ``value`` (a scalar tensor) as it stands after the work queued so far (``due``, ``drain`` read it)."""
        value = value.detach()
        if value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = value.clone(), None
        self._pending.append((step, host, event))

    def due(self, step: int) -> list[tuple[int, float]]:
        """The values pushed at ``step - lag`` or earlier, oldest first, as (step pushed, value)."""
        out = []
        while self._pending and self._pending[0][0] + self.lag <= step:
            out.append(self._read(*self._pending.popleft()))
        return out

    def drain(self) -> list[tuple[int, float]]:
        """Every pending value (on a GPU this waits for the work queued before the last push)."""
        out = [self._read(*entry) for entry in self._pending]
        self._pending.clear()
        return out

    @staticmethod
    def _read(step: int, host: torch.Tensor, event: torch.cuda.Event | None) -> tuple[int, float]:
        if event is not None:
            event.synchronize()
        return step, host.item()


def host_scalar(value: float) -> torch.Tensor:
    """A number known on the host, as a CPU tensor to ``self.log``: Lightning turns a Python number into a tensor on
    the module's device, a blocking copy that on a GPU waits for the queued work. A CPU tensor stays on the CPU."""
    return torch.tensor(float(value), dtype=torch.float32)
