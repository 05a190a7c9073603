"""The training precision ``auto``: ``bf16-mixed`` on a CPU that multiplies bf16 natively, ``32-true`` elsewhere.

On such a CPU (AVX512-BF16 or AMX), oneDNN runs bf16 matmuls and convolutions faster than float32 ones (measured by
``bench/precision.py``); without those instructions bf16 is emulated and slower than float32. On a GPU, ``auto``
keeps float32: the quickstart's tiny models are bound by kernel launches there, and autocast only adds casts
(docs/performance.md); choose a GPU run's precision by name.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def native_cpu_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16) or AMX tiles."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str | int | None, accelerator: object = "auto") -> str | int | None:
    """``precision`` as Lightning takes it: ``auto`` becomes ``bf16-mixed`` when the run trains on a CPU with
    native bf16 and ``32-true`` otherwise; any other value is returned unchanged. ``accelerator`` is the trainer's
    (``cpu``, ``gpu``, ``auto``...): ``auto`` trains on the CPU when no CUDA device is visible."""
    if str(precision) != AUTO:
        return precision
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    return "bf16-mixed" if on_cpu and native_cpu_bf16() else "32-true"


def autocast_precision(precision: str | int | None) -> str:
    """The dtype (a name) that Lightning's ``precision`` computes a frozen model's forward in: ``bfloat16`` for
    bf16 (mixed or true), ``float16`` for 16 (mixed or true), ``float32`` otherwise. ``auto`` must be resolved
    first (``resolve_precision``)."""
    name = str(precision)
    if name.startswith("bf16"):
        return "bfloat16"
    if name in ("16", "16-mixed", "16-true"):
        return "float16"
    return "float32"
