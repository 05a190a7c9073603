"""The quickstart's LDM step with the scratch text encoder's token table trained against kept at its init.

``text_encoder.train_token_embedding=false`` leaves the 49,408 x 128 table out of the backward's dense gradient,
the gradient norm and clipping, and AdamW. Both steps are built from the same seed (the same table) and alternate in
one process, ``--repeats`` times after two warm-up steps each, with the stage's clipping (norm 1). Printed: the median
step of each and the ratio trained/fixed (> 1: the fixed table is faster) with its per-repeat range.

    python bench/token_embedding.py --repeats 15 --threads 2 --dtype bf16 [--text-encoder scratch_tiny]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from alternate import alternated_times, built_from_one_seed, ratio_summary
from quickstart_steps import ldm_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--text-encoder", default="scratch_quickstart",
                        help="a conf/text_encoder preset: scratch_quickstart (the quickstart's) or scratch_tiny")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.dtype}, threads {args.threads}, "
          f"torch {torch.__version__}, text encoder {args.text_encoder}")
    steps = built_from_one_seed({
        name: partial(ldm_step, DTYPES[args.dtype], args.text_encoder, train_token_embedding=train, clip_norm=1.0)
        for name, train in (("trained", True), ("fixed", False))
    })
    print(f"LDM step, token table: {ratio_summary(alternated_times(steps, args.repeats), 'trained', 'fixed')}")


if __name__ == "__main__":
    main()
