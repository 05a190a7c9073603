"""Lightning's checkpoint plugin for ldm's runs: saves go through ``ldm.checkpoint``'s atomic writer.

It lives in the Lightning layer so that ``ldm.checkpoint``, which the pipeline and the samplers read through, does
not import Lightning (and the metrics packages Lightning imports with it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from ldm.checkpoint import atomic_torch_save


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
