"""Start-up time of ldm's entry points in fresh processes, against diffusers' pipeline import, alternated.

Each case is a new Python process running one snippet; the cases take turns, ``--repeats`` times, and the median
wall time of each is printed with its ratio to diffusers' (> 1: ldm starts faster) and to a bare ``import torch``
(the floor every case pays). What a user waits for before the first step or the first image:

- ``sample side``: the pipeline, the checkpoint reader and the shapes judge imported, and a prompt tokenised;
- ``train side``: what ``train.py`` imports (Lightning, Hydra, the stages);
- ``sample a checkpoint`` (with ``--ckpt``): the above, then ``from_checkpoint`` and ``--steps`` sampling steps;
- ``diffusers``: ``from diffusers import StableDiffusionPipeline`` and its CLIP tokenizer class.

    python bench/startup.py --repeats 5
    python bench/startup.py --repeats 5 --ckpt RUN/ldm/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "import torch": "import torch",
    "sample side": "import ldm.pipeline, ldm.checkpoint, ldm.eval.shapes\n"
                   "from ldm.text import CLIPTokenizer\nCLIPTokenizer()(['a red circle'])",
    "train side": "import hydra, lightning\nimport ldm.lightning.stages",
    "diffusers": "from diffusers import StableDiffusionPipeline\nfrom transformers import CLIPTokenizer",
}


def sample_snippet(ckpt: str, steps: int) -> str:
    return ("from ldm.pipeline import LatentDiffusionPipeline\n"
            f"pipe = LatentDiffusionPipeline.from_checkpoint({ckpt!r})\n"
            f"pipe(['a red circle in the center'], num_inference_steps={steps})")


def run(code: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"this snippet failed:\n{code}\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ckpt", default=None, help="an ldm checkpoint to load and sample from")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    cases = dict(CASES)
    if args.ckpt:
        cases["sample a checkpoint"] = sample_snippet(str(Path(args.ckpt).resolve()), args.steps)
    for code in cases.values():  # warm the file cache and the bytecode once
        run(code, args.threads)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, code in cases.items():
            times[name].append(run(code, args.threads))
    ref, floor = statistics.median(times["diffusers"]), statistics.median(times["import torch"])
    print(f"{'case':<22}{'median s':>10}{'range s':>16}{'diffusers / case':>18}{'case - torch s':>16}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22}{med:>10.2f}{f'{min(ts):.2f}..{max(ts):.2f}':>16}{ref / med:>18.2f}{med - floor:>16.2f}")


if __name__ == "__main__":
    main()
