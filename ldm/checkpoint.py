"""Self-describing checkpoints: each part is saved with its class path and constructor arguments, files are
written atomically, and one call rebuilds the parts."""

from __future__ import annotations

import glob
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from torch import nn


def module_spec(module: nn.Module, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"target": "package.Class", "kwargs": {...}}: the constructor arguments are ``kwargs`` if given (e.g. the
    part's resolved Hydra config without ``_target_``), else the part's own ``.config`` dict."""
    if kwargs is None:
        kwargs = getattr(module, "config", None)
        if not isinstance(kwargs, dict):
            raise TypeError(f"{type(module).__name__} has no .config dict of constructor arguments; pass kwargs")
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    cls = type(module)
    return {"target": f"{cls.__module__}.{cls.__qualname__}", "kwargs": kwargs}


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Construct a part from ``module_spec`` output (only classes inside the ``ldm`` package)."""
    target = spec["target"]
    if not target.startswith("ldm."):
        raise ValueError(f"refusing to build {target!r} from a checkpoint: only ldm.* classes are allowed")
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**spec["kwargs"])


def gather_rank_states(state: torch.Tensor) -> list[torch.Tensor]:
    """``state`` (e.g. a generator's ``get_state()``) of every rank, in rank order; ``[state]`` without a process
    group. A collective: under DDP call it on every rank (Lightning's ``on_save_checkpoint`` runs on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def rank_state(states: list[torch.Tensor], rank: int) -> torch.Tensor:
    """This rank's entry of ``gather_rank_states`` output (rank 0's when the checkpoint had fewer ranks)."""
    return states[rank] if rank < len(states) else states[0]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename: a crash (even SIGKILL) leaves the
    old file whole. Temporaries of ``path`` that a killed writer left behind are removed after a successful save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO whose saves are atomic (Lightning's default writes the target file in place)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location=None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """torch.load onto ``map_location`` (the CPU by default); full unpickling unless ``weights_only`` is True."""
        return torch.load(path, map_location=map_location or "cpu", weights_only=bool(weights_only))

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        Path(path).unlink(missing_ok=True)
