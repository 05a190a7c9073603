"""Where a training step's time goes, by kernel family, and each family's FLOP/s against a large matmul's.

The step is the quickstart's LDM or VAE step (``bench/quickstart_steps.py``, on the CPU) or a ``bench/unet.py``
config's UNet step (``bench/mfu.py``'s forward, backward and fused AdamW, on any device). torch's profiler times it:
each profiled op goes to the family of its outermost ancestor that names one, so attention's inner matmuls stay
attention and a Linear's ``addmm`` counts once. ``FlopCounterMode`` (``ldm.lightning.flops``, as the logged
``perf/tflops``) counts each family's FLOPs. The reference rate is one 2048 x 2048 matmul in the step's dtype,
timed in the same process before and after the step's timings (the better of the two). torch's profiler table
alone gives per-op times, without the backward's FLOPs or the families' totals; this grouping is what
docs/performance.md's kernel rates come from.

    python bench/kernel_families.py --step ldm --threads 2                  # the quickstart's LDM step, float32
    python bench/kernel_families.py --step vae --dtype bf16 --threads 2 --top 10
    python bench/kernel_families.py --config sd15 --batch 32 --device cuda --dtype bf16

On a CPU without native bf16 (no AVX512-BF16 or AMX) torch's bf16 matmul is a slow fallback, so ``--dtype bf16``
there gives rates far above that reference. On a GPU the times are the kernels' (the profiler's device time of each
op and its children). With the ``math`` attention back end, attention's FLOPs are counted as matmuls (the FLOP
counter sees the decomposed products) while its forward's time stays attention's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from ldm.lightning.flops import flop_counter_mode

try:  # run as a script from the repository root: bench/ is on sys.path
    from mfu import TrainStep, _sync, matmul_peak, median_seconds
    from unet import CONFIGS, DTYPES
except ImportError:  # imported as bench.kernel_families
    from bench.mfu import TrainStep, _sync, matmul_peak, median_seconds
    from bench.unet import CONFIGS, DTYPES

MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
ACTIVATIONS = frozenset({"aten::gelu", "aten::gelu_backward", "aten::silu", "aten::silu_backward"})

#: (family, whether an op name belongs to it), first match wins; anything outside every family is "other"
FAMILIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("attention", lambda n: any(k in n for k in ("scaled_dot_product", "flash_attention", "efficient_attention"))),
    ("convolution backward", lambda n: n == "aten::convolution_backward"),
    ("convolution forward", lambda n: n == "aten::convolution"),
    ("matmul", lambda n: n in MATMULS),
    ("normalisation", lambda n: "group_norm" in n or "layer_norm" in n),
    ("activations", lambda n: n in ACTIVATIONS),
    ("optimizer step", lambda n: n.startswith("Optimizer.step")),
    ("copies and concatenation", lambda n: n in ("aten::copy_", "aten::cat")),
)


def family_of(name: str) -> str | None:
    """The family an op (``aten::mm``) or a FLOP counter key (``aten.mm``) belongs to, None for none."""
    name = name.replace("aten.", "aten::", 1) if name.startswith("aten.") else name
    return next((family for family, member in FAMILIES if member(name)), None)


@dataclass
class Share:
    """One family's profiled ops: how many, and their time in microseconds."""

    calls: int = 0
    time_us: float = 0.0


def _time_us(event, device: bool) -> float:
    if not device:
        return event.cpu_time_total
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def attribute(events: Iterable, device: bool = False) -> dict[str, Share]:
    """Each family's calls and inclusive time (CPU time, or with ``device`` the kernels' time) over profiled
    ``events``: an event counts for its own family only when no ancestor of it belongs to a family."""
    shares: dict[str, Share] = {}
    for event in events:
        family = family_of(event.name)
        if family is None or str(getattr(event, "device_type", "CPU")).rsplit(".", 1)[-1] != "CPU":
            continue  # a device-side copy of a host region (the GPU annotation of Optimizer.step) would count twice
        parent = event.cpu_parent
        while parent is not None and family_of(parent.name) is None:
            parent = parent.cpu_parent
        if parent is not None:  # inside another family's op: counted there
            continue
        share = shares.setdefault(family, Share())
        share.calls += 1
        share.time_us += _time_us(event, device)
    return shares


def family_flops(step: Callable[[], None]) -> dict[str, int]:
    """FLOPs of one ``step()`` per family, as ``FlopCounterMode`` counts them (matmuls, convolutions, attention)."""
    with flop_counter_mode(model=False) as counter:  # a family's rate: the products its kernels execute
        step()
    flops: dict[str, int] = {}
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        family = family_of(str(op)) or "other"
        flops[family] = flops.get(family, 0) + count
    return flops


def profile_step(step: Callable[[], None], device: torch.device, steps: int,
                 record_shapes: bool = False) -> tuple[profile, float]:
    """The profiler over ``steps`` calls of ``step``, and their wall time per step under it (seconds)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = (time.perf_counter() - start) / steps
    return prof, wall


def build_step(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], str]:
    """The step to profile and a line naming it."""
    if args.step is not None:
        if device.type != "cpu":
            raise SystemExit(f"--step {args.step} is the quickstart's CPU step; on {device.type} give --config")
        try:
            from quickstart_steps import STEPS
        except ImportError:
            from bench.quickstart_steps import STEPS
        step = STEPS[args.step](dtype if dtype != torch.float32 else None, **({"clip_norm": 1.0}
                                                                            if args.step == "ldm" else {}))
        return step, f"the quickstart's {args.step} step"
    from ldm.unet import UNet

    cfg = dict(CONFIGS[args.config])
    latent = args.latent or cfg["latent"]
    cfg.pop("latent")
    torch.manual_seed(0)
    unet = UNet(**cfg).to(device).train()
    return TrainStep(unet, args.batch, latent, cfg["context_dim"], device, dtype), (
        f"config={args.config} latent={latent} batch={args.batch}")


def report(shares: dict[str, Share], flops: dict[str, int], steps: int, wall: float, peak: float,
           device: bool) -> list[str]:
    """The table's lines: each family's time per step, share of the profiled step, FLOPs and rate against ``peak``."""
    lines = [f"{'family':<26} {'calls':>6} {'ms/step':>9} {'share':>7} {'GFLOP':>9} {'GFLOP/s':>9} {'of matmul':>9}"]
    counted = 0.0
    for family, _ in FAMILIES:
        share = shares.get(family, Share())
        ms = share.time_us / 1e3 / steps
        counted += ms
        gflop = flops.get(family, 0) / 1e9
        rate = f"{gflop / (ms / 1e3):9.1f} {gflop / (ms / 1e3) * 1e9 / peak:9.0%}" if gflop and ms else f"{'':>19}"
        lines.append(f"{family:<26} {share.calls // steps:>6} {ms:>9.2f} {ms / (wall * 1e3):>7.1%} "
                     f"{gflop:>9.3f} {rate}")
    rest = wall * 1e3 - counted
    where = "the rest of the step's time (no kernel family: element-wise ops, the framework, idle)" if device else (
        "everything else (element-wise ops, Python and the framework)")
    lines.append(f"{'other':<26} {'':>6} {rest:>9.2f} {rest / (wall * 1e3):>7.1%}   {where}")
    return lines


def _shapes(shapes: list) -> list:
    """Input shapes without the trailing empty ones (scalars and options)."""
    shapes = list(shapes)
    while shapes and not shapes[-1]:
        shapes.pop()
    return shapes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--step", choices=["ldm", "vae"], default=None, help="the quickstart's step (CPU)")
    what.add_argument("--config", choices=sorted(CONFIGS), default=None, help="a bench/unet.py UNet config's step")
    parser.add_argument("--batch", type=int, default=None, help="with --config (default 8)")
    parser.add_argument("--latent", type=int, default=None, help="with --config (default per config)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--steps", type=int, default=5, help="timed and profiled steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before counting and timing")
    parser.add_argument("--matmul-size", type=int, default=2048, help="the reference matmul's side")
    parser.add_argument("--top", type=int, default=0, help="also list the N ops (by input shapes) of most own time")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.step is None and args.config is None:
        args.step = "ldm"
    if args.step is not None and (args.batch is not None or args.latent is not None):
        parser.error(f"--batch and --latent go with --config; the quickstart's {args.step} step has its own")
    args.batch = args.batch or 8
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # as train.py runs: a step reuses the memory the last one freed
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    step, name = build_step(args, device, dtype)
    for _ in range(args.warmup):
        step()
    flops = family_flops(step)
    before = matmul_peak(device, dtype, n=args.matmul_size)
    step_time = median_seconds(step, device, args.steps)
    prof, wall = profile_step(step, device, args.steps, record_shapes=args.top > 0)
    # the better of two, around the timings: a shared CPU's pace moves
    peak = max(before, matmul_peak(device, dtype, n=args.matmul_size))
    on_device = device.type == "cuda"
    shares = attribute(prof.events(), device=on_device)
    print(f"{name} dtype={args.dtype} device={torch.cuda.get_device_name(device) if on_device else 'cpu'} "
          f"threads={torch.get_num_threads()}")
    print(f"step {step_time * 1e3:.1f} ms (median of {args.steps}), {wall * 1e3:.1f} ms under the profiler; "
          f"{sum(flops.values()) / 1e9:.2f} GFLOP per step; a {args.matmul_size} x {args.matmul_size} matmul: "
          f"{peak / 1e9:.0f} GFLOP/s "
          f"(the better of two, before and after)")
    print("\n".join(report(shares, flops, args.steps, wall, peak, on_device)))
    if args.top:
        key = "self_device_time_total" if on_device else "self_cpu_time_total"
        averages = prof.key_averages(group_by_input_shape=True)
        print(f"\nthe {args.top} ops (by input shapes) of most own {'kernel' if on_device else 'CPU'} time:")
        for avg in sorted(averages, key=lambda a: -getattr(a, key, 0.0))[:args.top]:
            print(f"  {getattr(avg, key, 0.0) / 1e3 / args.steps:8.2f} ms/step  {avg.count / args.steps:5.1f} calls  "
                  f"{avg.key}  {_shapes(avg.input_shapes)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
