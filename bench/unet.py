"""Benchmark our UNet against diffusers' UNet2DConditionModel with the same config and weights.

Alternates the two models in one process over several repeats; for each, one training step (forward, backward,
AdamW, or SGD with ``--optimizer sgd``) and one inference forward. Prints median times, time ratios diffusers/ours
(>= 1.0: we are no slower) and the peak-memory ratio of a training step (CUDA: max_memory_allocated; CPU: torch
profiler memory events).

    python bench/unet.py --config small --device cpu --dtype fp32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ldm.convert import to_diffusers
from ldm.unet import UNet

CONFIGS = {
    "tiny": dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=4,
                 context_dim=256, use_linear_proj=True, latent=8),
    "small": dict(model_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(2, 4),
                  num_head_channels=32, context_dim=512, use_linear_proj=True, latent=32),
    "sd15": dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2, 1),
                 num_heads=8, context_dim=768, use_linear_proj=False, latent=64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while running ``fn`` (CUDA allocator stats, or the profiler's CPU memory events)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # each event's self allocations (frees negative), in time order: the running sum is the live memory
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _ldm_optimizer(dtype: str) -> Callable[..., torch.optim.Optimizer]:
    """The AdamW partial ldm's trainer builds (``ldm.lightning.stages.build_optimizer``) for this precision, at the
    benchmark's learning rate and diffusers' scripts' weight decay."""
    from omegaconf import OmegaConf  # noqa: PLC0415  (only this option needs the configs)

    from ldm.lightning.stages import build_optimizer  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[dtype]
    cfg = OmegaConf.create({"optimizer": OmegaConf.load(root / "conf/optimizer/adamw.yaml"),
                            "trainer": {"precision": precision}})
    cfg.optimizer.lr, cfg.optimizer.weight_decay = 1e-6, 0.01
    return build_optimizer(cfg)


def main() -> None:
    """Parse arguments, build both models with the same weights, time them alternately, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (weights stay fp32)")
    parser.add_argument("--backend", default="sdpa", help="our attention backend: sdpa | math | xformers | auto")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=None, help="latent size (default per config)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both models")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (timed after warm-up)")
    parser.add_argument("--channels-last", action="store_true", help="our UNet in channels-last memory format")
    parser.add_argument("--optimizer", choices=("adamw", "sgd", "own"), default="adamw",
                        help="adamw: torch's AdamW with its defaults for both; sgd (no momentum) keeps no state: "
                             "sd15's two models with AdamW need about 28 GB; own: each framework's AdamW, ours as "
                             "ldm's trainer builds it (conf/optimizer/adamw.yaml: fused), diffusers' as its training "
                             "scripts do (torch's defaults: foreach on CUDA, the per-tensor loop on the CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = dict(CONFIGS[args.config])
    latent = args.latent or cfg.pop("latent")
    cfg.pop("latent", None)
    torch.manual_seed(0)
    ours = UNet(**cfg, attention_backend=args.backend, gradient_checkpointing=args.checkpointing)
    with torch.no_grad():  # non-zero everywhere, so every op does real work
        for p in ours.parameters():
            p.normal_(0, 0.02)
    theirs = to_diffusers(ours, sample_size=latent)
    if args.checkpointing:
        theirs.enable_gradient_checkpointing()
    models: dict[str, nn.Module] = {"ours": ours.to(device), "diffusers": theirs.to(device)}
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    ctx = torch.randn(args.batch, 77, cfg["context_dim"], device=device)
    target = torch.randn_like(x)
    if args.optimizer == "own":
        optims = {"ours": _ldm_optimizer(args.dtype)(ours.parameters()),
                  "diffusers": torch.optim.AdamW(theirs.parameters(), lr=1e-6, weight_decay=0.01)}
    else:
        optimizer = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
        optims = {k: optimizer(m.parameters(), lr=1e-6) for k, m in models.items()}
    if args.compile:  # the optimizers keep the eager parameters; the compiled wrappers share them
        models = {k: torch.compile(m) for k, m in models.items()}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward(name: str) -> torch.Tensor:
        out = models[name](x, t, ctx)
        return out.sample if name == "diffusers" else out

    def forward_backward(name: str) -> None:
        models[name].train()
        with autocast:
            loss = (forward(name).float() - target).square().mean()
        loss.backward()

    def train_step(name: str) -> None:
        forward_backward(name)
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(name: str) -> None:
        models[name].eval()
        with autocast:
            forward(name)

    def timed(fn: Callable[[str], None], name: str) -> float:
        _sync(device)
        start = time.perf_counter()
        fn(name)
        _sync(device)
        return time.perf_counter() - start

    with torch.no_grad(), autocast:  # the same weights and inputs must give the same outputs, or nothing is compared
        models["ours"].eval(), models["diffusers"].eval()
        diff = (forward("ours").float() - forward("diffusers").float()).abs().max().item()
    if diff > (1e-3 if args.dtype == "fp32" else 5e-2):
        raise SystemExit(f"the two UNets disagree before timing (max |difference| {diff:.2e}): not a comparison")
    for name in models:  # warm-up (allocator, kernels, optimizer state)
        train_step(name)
        infer(name)
    times: dict[tuple[str, str], list[float]] = {(n, k): [] for n in models for k in ("train", "infer")}
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            times[(name, "train")].append(timed(train_step, name))
            times[(name, "infer")].append(timed(infer, name))
    peak = {name: _peak_memory(lambda name=name: train_step(name), device) for name in models}
    peak_fb = {name: _peak_memory(lambda name=name: forward_backward(name), device) for name in models}
    for opt in optims.values():
        opt.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config={args.config} params={n_params:,} device={device} dtype={args.dtype} backend={args.backend} "
          f"batch={args.batch} latent={latent} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"checkpointing={args.checkpointing} compile={args.compile} optimizer={args.optimizer}")
    for kind in ("train", "infer"):
        med = {n: statistics.median(times[(n, kind)]) for n in models}
        ratios = [d / o for d, o in zip(times[("diffusers", kind)], times[("ours", kind)], strict=True)]
        print(f"{kind:5s}  ours {med['ours'] * 1e3:9.1f} ms   diffusers {med['diffusers'] * 1e3:9.1f} ms   "
              f"ratio diffusers/ours {med['diffusers'] / med['ours']:.3f} "
              f"(per repeat {min(ratios):.2f}..{max(ratios):.2f})")
    for label, p in ((f"train step (fwd+bwd+{args.optimizer})", peak), ("fwd+bwd", peak_fb)):
        print(f"peak memory {label}: ours {p['ours'] / 2**20:.1f} MiB   diffusers {p['diffusers'] / 2**20:.1f} MiB"
              f"   ratio diffusers/ours {p['diffusers'] / max(p['ours'], 1):.3f}")


if __name__ == "__main__":
    main()
