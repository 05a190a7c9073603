"""Exponential moving average of a module's parameters: a plain module whose state dict holds the averages under
the parameters' own names, so a checkpoint's EMA weights load into the model with ``load_state_dict`` alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

NUM_UPDATES = "num_updates"


@dataclass(frozen=True)
class EMASettings:
    """The EMA of a training run: ``decay``, and ``warmup`` (CompVis' rule, see :class:`EMA`)."""

    decay: float = 0.9999
    warmup: bool = True


class EMA(nn.Module):
    """Float32 shadow copies of ``model``'s floating-point parameters, moved toward it with ``update(model)``.

    decay_n = min(decay, (1 + n) / (10 + n)) with ``warmup`` (early averages follow the model instead of holding on
    to the random initialisation), else ``decay``; ``n`` counts the updates. ``state_dict()`` is
    ``{parameter name: average, ..., "num_updates": n}``. State dicts written by the earlier layout
    (``shadow_<i>`` in parameter order) still load.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self._names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        if NUM_UPDATES in self._names:
            raise ValueError(f"a parameter named {NUM_UPDATES!r} collides with the EMA's update counter")
        # Buffers (so .to() moves them) whose names are positions: a buffer name cannot hold the dots of a
        # parameter name. The state dict maps them to the parameter names.
        for i, name in enumerate(self._names):
            self.register_buffer(f"shadow_{i}", model.get_parameter(name).detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = 0  # num_updates counted on the host; None: read the buffer once

    def _shadows(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, name in enumerate(self._names):
            yield name, getattr(self, f"shadow_{i}")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, shadow in self._shadows():
            destination[prefix + name] = shadow if keep_vars else shadow.detach()
        destination[prefix + NUM_UPDATES] = self.num_updates if keep_vars else self.num_updates.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        legacy = f"{prefix}shadow_0" in state_dict
        expected = {NUM_UPDATES: self.num_updates}
        for i, (name, shadow) in enumerate(self._shadows()):
            expected[f"shadow_{i}" if legacy else name] = shadow
        for key, target in expected.items():
            value = state_dict.get(prefix + key)
            if value is None:
                missing_keys.append(prefix + key)
            elif value.shape != target.shape:
                error_msgs.append(f"size mismatch for {prefix + key}: checkpoint {tuple(value.shape)}, EMA "
                                  f"{tuple(target.shape)}")
            else:
                with torch.no_grad():
                    target.copy_(value)
        self._host_updates = None
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in expected)

    def _updates(self) -> int:
        """num_updates, read from the buffer once after loading and then counted on the host: reading a GPU buffer
        at every update would make the host wait for the GPU."""
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        return self._host_updates

    def current_decay(self) -> float:
        n = self._updates()
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward ``model``'s current parameters."""
        d = self.current_decay()
        named = dict(model.named_parameters())  # one walk of the module tree, not one per parameter
        shadows, params = [], []
        for name, shadow in self._shadows():
            shadows.append(shadow)
            # a no-op for float32 parameters on the shadow's device (the usual case): no copies
            params.append(named[name].detach().to(shadow.device, torch.float32))
        torch._foreach_lerp_(shadows, params, 1.0 - d)  # one fused pass instead of a Python loop over tensors
        self._host_updates = self._updates() + 1  # before the buffer moves on
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
