"""Exponential moving average of a module's parameters: a plain module whose state dict holds the averages under
the parameters' own names, so a checkpoint's EMA weights load into the model with ``load_state_dict`` alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

NUM_UPDATES = "num_updates"
ASSEMBLY_BUCKET_NUMEL = 2**22  # elements of full averages gathered per collective (16 MiB in float32)


@dataclass(frozen=True)
class EMASettings:
    """The EMA of a training run: ``decay``, and ``warmup`` (diffusers' rule, see :class:`EMA`)."""

    decay: float = 0.9999
    warmup: bool = True


def _check_tiling(name: str, spans: Sequence[tuple[int, int]], numel: int) -> None:
    """Raise unless the ranks' ``spans`` of parameter ``name`` cover its ``numel`` elements once each."""
    covered = 0
    for start, stop in sorted(s for s in spans if s[1] > s[0]):
        if start != covered:
            break
        covered = stop
    if covered != numel:
        raise ValueError(f"EMA.keep_shards: the ranks' spans of {name} ({list(spans)}) do not cover its {numel} "
                         "elements once each: not a sharding this EMA can assemble")


@dataclass(frozen=True)
class ShardLayout:
    """How a sharded model's parameters are split over the ranks of its sharding group: ``spans[r][name]`` is the
    [start, stop) of the flattened parameter ``name`` that rank ``r`` holds ((0, 0): none), ``rank`` is this rank's
    index in ``spans``, and ``gather(t)`` returns every rank's ``t`` (the same size on each) in that order: a
    collective (``ldm.lightning.sharding.shard_layout`` builds one for FSDP)."""

    spans: Sequence[Mapping[str, tuple[int, int]]]
    rank: int
    gather: Callable[[torch.Tensor], list[torch.Tensor]]


class EMA(nn.Module):
    """Float32 shadow copies of ``model``'s floating-point parameters, moved toward it with ``update(model)``.

    decay_n = min(decay, (1 + n) / (10 + n)) with ``warmup`` (early averages follow the model instead of holding on
    to the random initialisation), else ``decay``; ``n`` counts the earlier updates (diffusers' ``EMAModel``; CompVis'
    ``LitEma`` counts this one too). ``state_dict()`` is
    ``{parameter name: average, ..., "num_updates": n}``. State dicts written by the earlier layout
    (``shadow_<i>`` in parameter order) still load.

    With ``keep_shards`` each rank of a sharded model (FSDP) keeps and updates only its part of the averages, from its
    part of the parameters; the full averages are assembled (a collective) only where they are read: the state dict,
    ``averaged_state_dict``, ``copy_to`` and ``swapped_in``, a bucket of parameters per collective.
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
        self._spans: dict[str, tuple[int, int]] = {}  # keep_shards: [start, stop) of each flattened average
        self._shapes: dict[str, torch.Size] = {}  # the full shapes of the sharded averages
        self._layout: ShardLayout | None = None
        self._bucket_numel = ASSEMBLY_BUCKET_NUMEL

    def _apply(self, fn, recurse: bool = True):
        """Moves keep the averages float32: a cast of the module (``.to(torch.bfloat16)``, ``.half()``, Lightning's
        ``bf16-true`` / ``16-true``) moves them to its device only; in half precision an update of 1 - decay would
        round away."""
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return fn(t)
            probe = fn(t.new_empty(0))
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)
        return super()._apply(keep_float32, recurse)

    def keep_shards(self, layout: ShardLayout, bucket_numel: int = ASSEMBLY_BUCKET_NUMEL) -> None:
        """Keep only this rank's elements [start, stop) of each flattened average named in ``layout.spans``: its
        part of a sharded model, whose parameters are then flat views of the same elements (FSDP's
        ``use_orig_params``). Averages not named stay whole.

        The full averages are assembled with ``layout.gather``, one collective per ``bucket_numel`` elements of full
        averages (at least one parameter each): each rank sends its parts of a bucket's parameters, concatenated, and
        places every rank's parts by their spans. Every rank must hold the same layout (it is built collectively)."""
        own = layout.spans[layout.rank]
        if self._spans:  # a later fit of the same module: the same shards, perhaps another process group
            if any(tuple(own.get(name, ())) != span for name, span in self._spans.items()):
                raise RuntimeError("EMA.keep_shards: the averages are already kept in other shards")
            self._layout, self._bucket_numel = layout, bucket_numel
            return
        for i, (name, shadow) in enumerate(self._shadows()):
            if name not in own:
                continue
            _check_tiling(name, [spans[name] for spans in layout.spans], shadow.numel())
            start, stop = own[name]
            self._shapes[name] = shadow.shape
            self._spans[name] = (start, stop)
            setattr(self, f"shadow_{i}", shadow.reshape(-1)[start:stop].clone())
        self._layout, self._bucket_numel = layout, bucket_numel

    @property
    def sharded(self) -> bool:
        """Whether this rank keeps only its part of some averages (``keep_shards``)."""
        return bool(self._spans)

    def _assembled(self, parts: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for each (name, this rank's part), in order: the sharded ones gathered a bucket at a
        time (a collective per bucket; at most a bucket of full tensors is held at once), the others as they are."""
        bucket: list[tuple[str, torch.Tensor]] = []
        numel = 0
        for name, part in parts:
            if bucket and (numel >= self._bucket_numel or part.dtype != bucket[0][1].dtype):
                yield from self._gathered(bucket)
                bucket, numel = [], 0
            bucket.append((name, part))
            numel += self._shapes[name].numel() if name in self._spans else 0
        if bucket:
            yield from self._gathered(bucket)

    def _gathered(self, bucket: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The full tensors of one bucket of (name, part) pairs of one dtype: one gather of every rank's parts."""
        sharded = [name for name, _ in bucket if name in self._spans]
        full: dict[str, torch.Tensor] = {}
        if sharded:
            assert self._layout is not None
            parts = [part.reshape(-1) for name, part in bucket if name in self._spans]
            lengths = [[spans[name][1] - spans[name][0] for name in sharded] for spans in self._layout.spans]
            sent = parts[0].new_empty(max(sum(n) for n in lengths))  # the gather takes one size from every rank
            mine = sum(lengths[self._layout.rank])
            torch.cat(parts, out=sent[:mine])
            sent[mine:].zero_()
            # empty, not zeros: the ranks' spans tile every parameter (checked in keep_shards)
            full = {name: sent.new_empty(self._shapes[name].numel()) for name in sharded}
            for spans, received, sizes in zip(self._layout.spans, self._layout.gather(sent), lengths, strict=True):
                for name, piece in zip(sharded, received[:sum(sizes)].split(sizes), strict=True):
                    start, stop = spans[name]
                    full[name][start:stop] = piece
        for name, part in bucket:
            yield name, full[name].view(self._shapes[name]) if name in full else part

    def _part(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``full`` of ``name`` (itself when it is not sharded)."""
        if name not in self._spans:
            return full
        start, stop = self._spans[name]
        return torch.flatten(full)[start:stop]  # a function, not a method: it loads Lightning's lazily loaded tensors

    def _shadows(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, name in enumerate(self._names):
            yield name, getattr(self, f"shadow_{i}")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        shadows = ((name, shadow if keep_vars else shadow.detach()) for name, shadow in self._shadows())
        for name, value in self._assembled(shadows):
            # an assembled average goes to the host at once: all of them on the device would be a whole shadow again
            destination[prefix + name] = value.cpu() if name in self._spans else value
        destination[prefix + NUM_UPDATES] = self.num_updates if keep_vars else self.num_updates.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        legacy = f"{prefix}shadow_0" in state_dict
        expected: dict[str, tuple[str | None, torch.Tensor]] = {NUM_UPDATES: (None, self.num_updates)}  # key: name
        for i, (name, shadow) in enumerate(self._shadows()):
            expected[f"shadow_{i}" if legacy else name] = (name, shadow)
        for key, (name, target) in expected.items():
            value = state_dict.get(prefix + key)
            shape = self._shapes.get(name, target.shape)
            if value is None:
                missing_keys.append(prefix + key)
            elif value.shape != shape:
                error_msgs.append(f"size mismatch for {prefix + key}: checkpoint {tuple(value.shape)}, EMA "
                                  f"{tuple(shape)}")
            else:
                with torch.no_grad():
                    target.copy_(self._part(name, value) if name is not None else value)
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
        """With warm-up, diffusers' ``EMAModel`` rule: 0 at the first update (the average starts as the weights),
        then ``min(decay, (1 + n) / (10 + n))`` at update n + 1."""
        n = self._updates()
        if not self.warmup:
            return self.decay
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward ``model``'s current parameters."""
        d = self.current_decay()
        named = dict(model.named_parameters())  # one walk of the module tree, not one per parameter
        shadows, params = [], []
        for name, shadow in self._shadows():
            param = named[name].detach()
            if name in self._spans:
                if param.numel() == self._shapes[name].numel() != shadow.numel():
                    # still gathered (FSDP's SHARD_GRAD_OP reshards in the backward: a step that skipped its
                    # backward leaves them whole): this rank's elements of it
                    param = self._part(name, param)
                elif param.numel() != shadow.numel():
                    raise RuntimeError(f"EMA.update: {name} has {param.numel()} elements here and its average "
                                       f"{shadow.numel()} of {self._shapes[name].numel()}: the model is not sharded "
                                       "as it was at keep_shards")
                param = param.reshape(-1)  # this rank's part: a flat view of the same elements
            shadows.append(shadow)
            # a no-op for float32 parameters on the shadow's device (the usual case): no copies
            params.append(param.to(shadow.device, torch.float32))
        torch._foreach_lerp_(shadows, params, 1.0 - d)  # one fused pass instead of a Python loop over tensors
        self._host_updates = self._updates() + 1  # before the buffer moves on
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages (with ``keep_shards``: its full parameters, e.g.
        inside FSDP's ``summon_full_params``)."""
        for name, average in self._assembled(self._shadows()):
            p = model.get_parameter(name)
            p.copy_(average.view_as(p).to(p.dtype))

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averages under the model's own parameter names (for export or a plain ``load_state_dict``)."""
        return {name: average if name in self._spans else average.clone()
                for name, average in self._assembled(self._shadows())}

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """Run a block with the averaged weights in ``model``, restoring the trained weights afterwards. With
        ``keep_shards`` the model's parameters are full ones and only this rank's part of them is kept aside."""
        backup = {name: self._part(name, model.get_parameter(name).detach()).clone() for name in self._names}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in self._assembled(backup.items()):
                    p = model.get_parameter(name)
                    p.copy_(value.view_as(p))
