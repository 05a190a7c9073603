"""Model FLOP utilisation of our UNet's training step, and the largest batch that fits on a GPU.

One training step is forward, backward and fused AdamW under autocast (bf16 by default on a GPU). Its FLOPs are
counted once with ``ldm.lightning.flops.count_flops`` (matmuls, convolutions, attention); MFU = FLOPs per step /
median step time / peak, where the FLOPs are the model's: the forward that gradient checkpointing recomputes is not
counted in MFU (it is in the hardware FLOP utilisation printed beside it). The peak is the GPU's dense bf16 figure
from ``ldm.lightning.flops``, or ``--peak`` (FLOP/s); on the CPU, ``--peak matmul`` measures one 2048 x 2048 fp32
matmul, the roof the step's kernels could reach.

    python bench/mfu.py --config sd15 --latent 64 --max-batch                  # 512 px: the largest batch, its MFU
    python bench/mfu.py --config sd15 --latent 64 --max-batch --checkpointing  # the same with gradient checkpointing
    python bench/mfu.py --config sd15 --latent 32 --max-batch                  # 256 px
    python bench/mfu.py --config tiny --device cpu --dtype fp32 --batch 48 --peak matmul --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm.lightning.flops import count_flops, device_peak_flops
from ldm.unet import UNet

try:  # run as a script from the repository root: bench/ is on sys.path
    from unet import CONFIGS, DTYPES
except ImportError:  # imported as bench.mfu
    from bench.unet import CONFIGS, DTYPES


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of one n x n matmul on ``device`` (median of ``repeats``)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, each waited for on a GPU."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TrainStep:
    """One training step of ``unet`` at a batch size: forward, MSE to a fixed target, backward, fused AdamW."""

    def __init__(self, unet: UNet, batch: int, latent: int, context_dim: int, device: torch.device,
                 dtype: torch.dtype):
        self.unet, self.device, self.dtype = unet, device, dtype
        self.x = torch.randn(batch, unet.in_channels, latent, latent, device=device)
        self.t = torch.randint(0, 1000, (batch,), device=device)
        self.ctx = torch.randn(batch, 77, context_dim, device=device)
        self.target = torch.randn_like(self.x)
        self.opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=True)

    def forward_backward(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = (self.unet(self.x, self.t, self.ctx).float() - self.target).square().mean()
        loss.backward()

    def __call__(self) -> None:
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def fits(build, batch: int, unet: torch.nn.Module) -> bool:
    """Whether two training steps at ``batch`` run without a CUDA out-of-memory error (the second holds the
    optimizer state too)."""
    step = None
    try:
        step = build(batch)
        step()
        step()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del step
        unet.zero_grad(set_to_none=True)  # an out-of-memory backward may have left some
        torch.cuda.empty_cache()


def largest_batch(build, unet: torch.nn.Module, start: int = 8, limit: int = 4096) -> int:
    """The largest batch that ``fits``, to within 1/16 of it: doubling from ``start``, then bisecting (0 if even 1
    does not fit). The last 6% would cost several more probes of two steps at the largest batches."""
    lo, hi = 0, start
    while hi <= limit and fits(build, hi, unet):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(build, mid, unet) else (lo, mid)
    return lo


def step_flops(build, unet: UNet, batch: int) -> tuple[float, float]:
    """FLOPs of one training step at ``batch``: the model's (what MFU counts) and, with gradient checkpointing, the
    hardware's (the forward it recomputes in the backward counted too). Both are counted at batch 1 and scaled:
    every counted op is linear in the batch, and a counted step at the largest batch would take seconds."""
    checkpointing = unet.gradient_checkpointing
    try:
        unet.gradient_checkpointing = False
        model = count_flops(build(1).forward_backward)
        unet.gradient_checkpointing = checkpointing
        hardware = count_flops(build(1).forward_backward) if checkpointing else model
    finally:
        unet.gradient_checkpointing = checkpointing
        unet.zero_grad(set_to_none=True)
    return model * batch, hardware * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="autocast dtype (GPU: bf16, CPU: fp32)")
    parser.add_argument("--latent", type=int, default=None, help="latent size (default per config; 64 = 512 px)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-batch", action="store_true", help="GPU: find the largest batch that fits, use it")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after two warm-up steps)")
    parser.add_argument("--peak", default=None, help="peak FLOP/s, or 'matmul' to measure it (default: GPU table)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = dict(CONFIGS[args.config])
    latent = args.latent or cfg.pop("latent")
    cfg.pop("latent", None)
    torch.manual_seed(0)
    unet = UNet(**cfg, gradient_checkpointing=args.checkpointing).to(device).train()

    def build(batch: int) -> TrainStep:
        return TrainStep(unet, batch, latent, cfg["context_dim"], device, dtype)

    batch = args.batch
    if args.max_batch:
        if device.type != "cuda":
            raise SystemExit("--max-batch needs a CUDA device (a CPU run would swap rather than fail); give --batch")
        batch = largest_batch(build, unet)
        print(f"largest batch that fits: {batch} (latent {latent}, checkpointing={args.checkpointing})")
        if batch == 0:
            return
    flops, hardware_flops = step_flops(build, unet, batch)
    step = build(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    dt = median_seconds(step, device, args.steps)
    if args.peak == "matmul":
        peak = matmul_peak(device, dtype)
    else:
        # the table holds dense bf16 peaks: an fp32 run gets no MFU from it (the Throughput callback's rule)
        peak = float(args.peak) if args.peak else (device_peak_flops(device) if dtype != torch.float32 else None)
    memory = f" peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"config={args.config} latent={latent} batch={batch} dtype={dtype} checkpointing={args.checkpointing} "
          f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}{memory}")
    print(f"step {dt * 1e3:.1f} ms (median of {args.steps}), {flops / 1e9:.1f} GFLOP per step, "
          f"{flops / dt / 1e12:.3f} TFLOP/s, {batch / dt:.1f} samples/s")
    if peak:
        source = "a measured matmul" if args.peak == "matmul" else "the peak"
        print(f"MFU {flops / dt / peak:.1%} of {peak / 1e12:.3f} TFLOP/s ({source})")
        if hardware_flops != flops:
            print(f"hardware FLOP utilisation {hardware_flops / dt / peak:.1%} (with the recomputed forward: "
                  f"{hardware_flops / 1e9:.1f} GFLOP per step)")
    else:
        print("MFU: no peak for this device and dtype (the table holds dense bf16 peaks; give --peak FLOP/s or "
              "--peak matmul)")


if __name__ == "__main__":
    main()
