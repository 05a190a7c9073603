"""Self-describing checkpoints: each part is saved with its class path and constructor arguments, files are
written atomically, and one call rebuilds the parts."""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename: a crash leaves the old file."""
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


class AtomicCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO whose saves are atomic (Lightning's default writes the target file in place)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=False)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        Path(path).unlink(missing_ok=True)
