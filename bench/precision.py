"""The quickstart's training steps on the CPU in float32 against bf16 autocast (Lightning's ``bf16-mixed``).

Both precisions get their own models, built from the same seed, and their steps alternate in one process,
``--repeats`` times after two warm-up steps each. Printed: the median step time of each, the ratio fp32/bf16 (> 1:
bf16 is faster) with its per-repeat range, and whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). On a
CPU without it, bf16 matmuls and convolutions are emulated and slower than float32.

    python bench/precision.py --repeats 15 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch
from alternate import alternated_times
from quickstart_steps import STEPS

from ldm.lightning.precision import native_cpu_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=sorted(STEPS), default=["ldm", "vae"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_cpu_bf16()}, "
          f"threads {args.threads}, torch {torch.__version__}")
    for kind in args.kinds:
        steps = {}
        for name, dtype in DTYPES.items():
            torch.manual_seed(0)
            steps[name] = STEPS[kind](dtype)
            for _ in range(2):
                steps[name]()
        times = alternated_times(steps, args.repeats)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ratios = [a / b for a, b in zip(times["fp32"], times["bf16"], strict=True)]
        print(f"{kind} step: fp32 {med['fp32'] * 1e3:7.1f} ms   bf16 {med['bf16'] * 1e3:7.1f} ms   "
              f"ratio fp32/bf16 {med['fp32'] / med['bf16']:.3f} (per repeat {min(ratios):.2f}..{max(ratios):.2f}, "
              f"{args.repeats} repeats)")


if __name__ == "__main__":
    main()
