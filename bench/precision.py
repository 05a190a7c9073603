"""The quickstart's training steps on the CPU in float32 against bf16 autocast (Lightning's ``bf16-mixed``).

Both precisions get their own models, built from the same seed, and their steps alternate in one process,
``--repeats`` times after two warm-up steps each. Printed: the median step time of each, the ratio fp32/bf16 (> 1:
bf16 is faster) with its per-repeat range, and whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). On a
CPU without it, bf16 matmuls and convolutions are emulated and slower than float32.

    python bench/precision.py --repeats 15 --threads 2
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from alternate import alternated_times, built_from_one_seed, ratio_summary
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
        steps = built_from_one_seed({name: partial(STEPS[kind], dtype) for name, dtype in DTYPES.items()})
        times = alternated_times(steps, args.repeats)
        print(f"{kind} step: {ratio_summary(times, 'fp32', 'bf16')}")


if __name__ == "__main__":
    main()
