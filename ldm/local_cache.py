"""The folder where ldm keeps what it computes once for many runs: shard counts, bucket plans, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """``$LDM_CACHE/kind``, by default under ``~/.cache/ldm`` (of shards: ``shard_counts``, ``buckets``; compiled
    kernels: ``inductor``). An empty ``LDM_CACHE`` (a job script's unset variable) counts as unset, not as the
    current folder."""
    return Path(os.environ.get("LDM_CACHE") or "~/.cache/ldm").expanduser() / kind
