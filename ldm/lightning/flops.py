"""FLOP counting and device peaks: what ``perf/tflops`` and ``perf/mfu`` are computed from.

``PEAK_BF16_DENSE_FLOPS`` holds the dense (without sparsity) bf16 tensor-core peak FLOP/s per GPU, from the vendors'
datasheets (where one gives only a "with sparsity" figure, the dense one is half of it):

- NVIDIA H200 Tensor Core GPU datasheet: H200 SXM 1,979 TFLOPS with sparsity -> 989.4 dense; H200 NVL 1,671 -> 835.
- NVIDIA H100 Tensor Core GPU datasheet: H100 SXM 1,979 -> 989.4 dense; H100 PCIe 1,513 -> 756; H100 NVL 1,671 -> 835.
- NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS dense (624 with sparsity), SXM and PCIe alike.
- NVIDIA L40S datasheet: 362.05 TFLOPS dense (733 with sparsity).
- NVIDIA L4 datasheet: 242 TFLOPS with sparsity -> 121 dense.
- NVIDIA A10 datasheet: 125 TFLOPS dense (250 with sparsity); AWS's A10G has no NVIDIA datasheet and is taken as A10.
- NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090): 165.2 TFLOPS dense bf16 with FP32 accumulate.

V100 has no bf16 tensor cores and is left out: on it (and on any GPU not listed) no peak is known.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

# Device-name fragment -> dense bf16 peak FLOP/s. The first fragment found in the name wins, so a more specific
# fragment comes before the one it contains ("H100 PCIe" before "H100"). A fragment matches whole words only ("L4"
# is not found in "L40S", nor "A10" in "A100"); names look like "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB".
PEAK_BF16_DENSE_FLOPS: dict[str, float] = {
    "H200 NVL": 835e12,
    "H200": 989e12,  # SXM
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called ``name`` (as ``torch.cuda.get_device_name`` gives it), or None
    when it is not in ``PEAK_BF16_DENSE_FLOPS``: an unknown device gets no MFU rather than a wrong one."""
    for fragment, peak in PEAK_BF16_DENSE_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(fragment)}(?![A-Za-z0-9])", name, flags=re.IGNORECASE):
            return peak
    return None


def device_peak_flops(device: torch.device | None = None) -> float | None:
    """The dense bf16 peak FLOP/s of ``device`` (default: the current CUDA device), so MFU needs no configured peak;
    None on CPU, without CUDA, or for a GPU not in the table."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def _register_cpu_sdpa_formulas() -> None:
    """Count torch's CPU attention kernel like its CUDA ones, so a CPU count includes attention."""
    # FlopCounterMode has formulas for the flash, memory-efficient and cuDNN SDPA kernels only; on CPU
    # F.scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu (and its _backward), which
    # it counted as 0 FLOPs (torch 2.14). Their leading arguments are those of the CUDA kernels (query, key, value;
    # grad_out, query, key, value), so torch's own formulas apply as they are: forward 2 matmuls = 4*B*H*Lq*Lk*d,
    # backward 5 = 10*B*H*Lq*Lk*d. They are already shape-wrapped, hence get_raw. Skipped once torch counts them.
    aten = torch.ops.aten
    for op, helper in ((aten._scaled_dot_product_flash_attention_for_cpu, "sdpa_flop"),
                       (aten._scaled_dot_product_flash_attention_for_cpu_backward, "sdpa_backward_flop")):
        formula = getattr(flop_counter, helper, None)  # not public API: a torch without it leaves CPU attention out
        if formula is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


_register_cpu_sdpa_formulas()


_SDPA_BACKWARDS = ("_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
                   "_scaled_dot_product_cudnn_attention_backward", "_flash_attention_backward",
                   "_efficient_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward")


def _model_attention_backward() -> dict:
    """torch's SDPA backward formulas count 5 matmuls of the scores' size: the 4 of the gradients (dV, dP, dQ, dK)
    and the flash kernels' recomputation of Q K^T. Model FLOPs (MFU's numerator, as in PaLM's definition) count a
    backward as twice its forward, as for every other layer: 4 of the 5. The recomputation is the kernel's choice,
    like gradient checkpointing's, and counts in neither MFU nor HFU."""
    mapping = {}
    for name in _SDPA_BACKWARDS:
        op = getattr(torch.ops.aten, name, None)
        formula = flop_counter.flop_registry.get(op) if op is not None else None
        if formula is None:
            continue

        def model_count(*args, formula=formula, **kwargs) -> int:
            return formula(*args, **kwargs) * 4 // 5

        model_count._get_raw = True  # FlopCounterMode takes it as it is (the registered formula is shape-wrapped)
        mapping[op] = model_count
    return mapping


_MODEL_ATTENTION_BACKWARD = _model_attention_backward()  # after the CPU kernel's formulas are registered


def flop_counter_mode(model: bool = True) -> FlopCounterMode:
    """A silent FlopCounterMode that counts matmuls, convolutions and attention (CPU attention included): the model's
    FLOPs (attention's backward as twice its forward), or with ``model=False`` what the kernels execute (torch's
    formulas: the flash backward's recomputed scores too), for a kernel's rate."""
    return FlopCounterMode(display=False, custom_mapping=_MODEL_ATTENTION_BACKWARD if model else None)


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs ``fn()`` executes (forward, and backward if it runs one), as FlopCounterMode counts them."""
    with flop_counter_mode() as counter:
        fn()
    return counter.get_total_flops()
