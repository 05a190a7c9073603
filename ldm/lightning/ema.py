"""Exponential moving average of a module's parameters, kept as buffers so it is saved in every checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies of ``model``'s floating-point parameters, updated with ``update(model)`` after each step.

    decay_n = min(decay, (1 + n) / (10 + n)) with ``warmup`` (the CompVis rule: early averages follow the model
    closely instead of holding on to the random initialisation), else ``decay``. The shadow is float32 whatever the
    model's dtype. ``n`` is the number of updates so far, saved with the shadow.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self._names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        for i, name in enumerate(self._names):
            self.register_buffer(f"shadow_{i}", model.get_parameter(name).detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _shadows(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, name in enumerate(self._names):
            yield name, getattr(self, f"shadow_{i}")

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward ``model``'s current parameters."""
        d = self.current_decay()
        # one walk of the module tree: get_parameter per name walks it once per parameter (7 ms of a 10 ms update
        # for the 286 parameters of the tiny UNet)
        named = dict(model.named_parameters())
        shadows, params = [], []
        for name, shadow in self._shadows():
            shadows.append(shadow)
            # a no-op for float32 parameters on the shadow's device (the usual case): no copies
            params.append(named[name].detach().to(shadow.device, torch.float32))
        torch._foreach_lerp_(shadows, params, 1.0 - d)  # one fused pass instead of a Python loop over tensors
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages."""
        for name, shadow in self._shadows():
            p = model.get_parameter(name)
            p.copy_(shadow.to(p.dtype))

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averages under the model's own parameter names (for export or a plain ``load_state_dict``)."""
        return {name: shadow.clone() for name, shadow in self._shadows()}

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """Run a block with the averaged weights in ``model``, restoring the trained weights afterwards."""
        backup = {name: model.get_parameter(name).detach().clone() for name in self._names}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    model.get_parameter(name).copy_(value)
