"""Optimisation helpers shared by the training modules: the LR multiplier and the gradient norm."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def warmup_then(schedule: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps``, then ``constant``, or ``cosine`` or ``linear`` decay to 0
    at max_steps."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown lr schedule {schedule!r}; expected 'constant', 'cosine' or 'linear'")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The global L2 norm of the gradients of ``params`` (None when none has a gradient)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack(torch._foreach_norm(grads)).norm()  # one fused kernel per device and dtype group
