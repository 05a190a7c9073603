"""torch.compile for training and sampling, with the compiled kernels kept across runs."""

from __future__ import annotations

import os

from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from ldm.data.shards import cache_dir


def compile_in_place(module: nn.Module, mode: str | None = None) -> nn.Module:
    """``module.compile()``: in place, so the module keeps its class and state-dict names and checkpoints stay
    loadable. inductor's caches (FX graphs, autograd graphs, and Triton kernels on a GPU) go under
    ``$LDM_CACHE/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set: torch's default is a temporary folder, which
    reboots and cluster nodes lose, so a rerun or a resumed job would compile everything again. ``mode`` is
    torch.compile's (``reduce-overhead``: CUDA graphs on a GPU; None: its default)."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the variable once it has looked it up: that one is not a user's choice
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir("inductor"))
    module.compile(mode=mode)
    return module
