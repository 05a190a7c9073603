"""torch.compile for training, sampling and latent caching, with the compiled kernels kept across runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from ldm.local_cache import cache_dir

F = TypeVar("F", bound=Callable)


def keep_compiled_kernels() -> None:
    """Point inductor's caches (FX graphs, autograd graphs, and Triton kernels on a GPU) at ``$LDM_CACHE/inductor``
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set: torch's default is a temporary folder, which reboots and cluster
    nodes lose, so a rerun or a resumed job would compile everything again."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # here: importing inductor takes seconds

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the variable once it has looked it up: that one is not a user's choice
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir("inductor"))


def compile_in_place(module: nn.Module, mode: str | None = None) -> nn.Module:
    """``module.compile()``: in place, so the module keeps its class and state-dict names and checkpoints stay
    loadable; its kernels are kept across runs (``keep_compiled_kernels``). ``mode`` is torch.compile's
    (``reduce-overhead``: CUDA graphs on a GPU; None: its default)."""
    keep_compiled_kernels()
    module.compile(mode=mode)
    return module


def compile_function(fn: F, mode: str | None = None) -> F:
    """``torch.compile(fn)`` with its kernels kept across runs: for a method other than a module's forward (the
    VAE's ``encode`` while caching latents), which ``compile_in_place`` does not reach."""
    keep_compiled_kernels()
    return torch.compile(fn, mode=mode)
