"""Time several callables alternately: repeat r runs them in order when r is even and in reverse when odd, so that a
drift in the machine's speed falls on all of them alike. The benchmarks' ratios come from these lists."""

from __future__ import annotations

import time
from collections.abc import Callable


def alternated_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` calls each, alternated."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times
