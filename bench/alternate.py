"""Time several callables alternately: repeat r runs them in order when r is even and in reverse when odd, so that a
drift in the machine's speed falls on all of them alike. The benchmarks' ratios come from these lists."""

from __future__ import annotations

import statistics
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


def built_from_one_seed(
    builders: dict[str, Callable[[], Callable[[], object]]], warmup: int = 2, seed: int = 0
) -> dict[str, Callable[[], object]]:
    """Each builder's callable, built after seeding torch with ``seed`` (the same weights) and called ``warmup``
    times."""
    import torch

    runs = {}
    for name, build in builders.items():
        torch.manual_seed(seed)
        runs[name] = build()
        for _ in range(warmup):
            runs[name]()
    return runs


def ratio_summary(times: dict[str, list[float]], slow: str, fast: str) -> str:
    """Both medians in ms and the median of ``slow`` over that of ``fast`` (> 1: ``fast`` is faster), with the
    per-repeat range."""
    med = {name: statistics.median(times[name]) for name in (slow, fast)}
    ratios = [a / b for a, b in zip(times[slow], times[fast], strict=True)]
    return (f"{slow} {med[slow] * 1e3:7.1f} ms   {fast} {med[fast] * 1e3:7.1f} ms   ratio {slow}/{fast} "
            f"{med[slow] / med[fast]:.3f} (per repeat {min(ratios):.2f}..{max(ratios):.2f}, {len(ratios)} repeats)")
