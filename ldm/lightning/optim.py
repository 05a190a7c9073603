"""Optimisation helpers shared by the training modules: the LR multiplier and the gradient norm."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


def warmup_then(
    schedule: str, warmup_steps: int, max_steps: int, decay_fraction: float = 0.2
) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps``, then ``constant``, ``cosine`` or ``linear`` decay to 0 at
    max_steps, or ``wsd`` (warm-up, stable, decay): constant, then linear to 0 over the last ``decay_fraction`` of
    max_steps, so the model learns at the full rate for longer than under a cosine."""
    if schedule not in ("constant", "cosine", "linear", "wsd"):
        raise ValueError(f"unknown lr schedule {schedule!r}; expected 'constant', 'cosine', 'linear' or 'wsd'")
    if schedule == "wsd" and not 0 < decay_fraction <= 1:
        raise ValueError(f"lr_decay_fraction must be in (0, 1] for the wsd schedule, got {decay_fraction}")
    decay_start = max(warmup_steps, round(max_steps * (1 - decay_fraction)))

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "wsd":
            return min(1.0, max(0.0, (max_steps - step) / max(1, max_steps - decay_start)))
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate schedule of a stage: ``name`` (constant | cosine | linear | wsd) after ``warmup_steps``,
    ending at ``max_steps``; ``decay_fraction`` is wsd's final linear decay."""

    name: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 1
    decay_fraction: float = 0.2

    def factor(self) -> Callable[[int], float]:
        """The multiplier of the base LR at each optimizer step (for ``LambdaLR``)."""
        return warmup_then(self.name, self.warmup_steps, self.max_steps, self.decay_fraction)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The global L2 norm of the gradients of ``params`` (None when none has a gradient)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack(torch._foreach_norm(grads)).norm()  # one fused kernel per device and dtype group
