"""The latent cache's encoding pass: the VAE's encoder in float32, under bf16 autocast, and compiled, alternated.

Each variant is ``ldm.data.cache_latents.latent_moments`` (what ``cache_latents`` calls per batch) on the same
random-initialised VAE and the same images, timed ``--repeats`` times after warm-up calls (the first compiled call
compiles; its time is printed apart). Printed: ms per image for each, the ratio against eager float32 (> 1:
faster), and each variant's largest difference from float32 in the posterior mean, and its largest and root-mean-square
difference in units of the posterior's standard deviation (what training's latent sample draws around the mean).

    python bench/vae_encode.py --config tiny --size 32 --batch 256 --repeats 7 --threads 2    # the quickstart's
    python bench/vae_encode.py --vae RUN/vae/vae.ckpt --size 32 --batch 256 --repeats 7         # a trained one
    python bench/vae_encode.py --config kl_f8 --size 256 --batch 4 --repeats 3 --threads 2   # Stable Diffusion's
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from alternate import alternated_times
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.checkpoint import load_autoencoder
from ldm.data.cache_latents import latent_moments
from ldm.lightning.precision import native_cpu_bf16

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"eager fp32": ("float32", False), "eager bf16": ("bfloat16", False),
            "compiled fp32": ("float32", True), "compiled bf16": ("bfloat16", True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="a conf/autoencoder yaml: tiny (the quickstart's), kl_f8")
    parser.add_argument("--vae", default=None, help="a trained VAE instead (train.py's vae/vae.ckpt)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.vae:
        vae, args.config = load_autoencoder(args.vae), Path(args.vae).name
    else:
        vae = instantiate(OmegaConf.load(ROOT / "conf" / "autoencoder" / f"{args.config}.yaml"))
    vae = vae.eval().to(device)
    x = (torch.rand(args.batch, 3, args.size, args.size) * 2 - 1).to(device)
    print(f"{args.config} VAE at {args.size} px, batch {args.batch}, {args.device}, threads {args.threads}, "
          f"native CPU bf16: {native_cpu_bf16()}, torch {torch.__version__}")

    def timed(fn):
        def run():
            out = fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    runs = {}
    for name in args.variants:
        precision, compile_ = VARIANTS[name]
        runs[name] = timed(latent_moments(vae, precision, compile_, device))
        start = time.perf_counter()
        runs[name]()
        if compile_:
            print(f"{name}: first call (compiling) {time.perf_counter() - start:.1f} s")
        runs[name]()
    reference = latent_moments(vae, "float32", False, device)(x)
    times = alternated_times(runs, args.repeats)
    base = statistics.median(times["eager fp32"]) if "eager fp32" in times else None
    for name, t in times.items():
        mean, _ = runs[name]()
        diff = (mean.float() - reference[0]).abs()
        ratio = f", {base / statistics.median(t):.2f}x eager fp32" if base else ""
        in_std = diff / reference[1]
        rms = in_std.square().mean().sqrt()
        print(f"{name:14s} {statistics.median(t) / args.batch * 1e3:8.2f} ms/image{ratio}; mean differs from fp32 "
              f"by <= {diff.max():.2e}, in posterior std: max {in_std.max():.3f}, rms {rms:.4f}")


if __name__ == "__main__":
    main()
