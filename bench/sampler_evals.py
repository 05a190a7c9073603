"""Shapes-judge full match against UNet evaluations, per sampler and step count, on one checkpoint.

For each sampler and step count it samples the judge's ``n`` captions (the checkpoint's guidance and interval)
and counts the UNet's evaluations per image as the network sees them: a CFG step on the guided interval is two,
a step outside it one, and Heun's 2n - 1 calls are all counted. Prints one row per run and, per sampler, the
fewest evaluations that reach ``--target``; ``--json`` keeps the rows and ``--plot`` draws full match against
evaluations, one line per sampler (matplotlib).

    python bench/sampler_evals.py CKPT --samplers ddim dpm_solver++ euler heun unipc --steps 6 8 12 16 20 25 \
        --n 500 --json evals.json --plot docs/figures/sampler_evals.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm.eval.shapes import random_captions, score
from ldm.pipeline import LatentDiffusionPipeline


class EvaluationCounter:
    """Counts the rows (images) the wrapped UNet is called on."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.rows = 0
        unet.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.rows += int(args[0].shape[0])


def run(pipe: LatentDiffusionPipeline, counter: EvaluationCounter, sampler: str, steps: int, n: int, batch: int,
        seed: int) -> dict:
    """Sample and judge the first ``n`` judge captions; returns full/color/shape/position, evaluations per image and
    seconds."""
    captions = random_captions(n, seed)
    images = []
    counter.rows = 0
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        out = pipe(captions[i:i + batch], sampler=sampler, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(seed + i), output_type="tensor")
        images += list(((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    result = score(images, captions)
    return {"sampler": sampler, "steps": steps, "evaluations": counter.rows / n, "seconds": time.perf_counter() - t0,
            **{k: result[k] for k in ("full", "color", "shape", "position", "n")}}


def plot(rows: list[dict], target: float, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["evaluations"])
        ax.plot([r["evaluations"] for r in mine], [100 * r["full"] for r in mine], marker="o", label=sampler)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("UNet evaluations per image (CFG counted)")
    ax.set_ylabel("full match (%)")
    ax.set_title("Shapes judge against sampling cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--samplers", nargs="+", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[6, 8, 12, 16, 20, 25])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
    counter = EvaluationCounter(pipe.unet)
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else []
    done = {(r["sampler"], r["steps"]) for r in rows}
    for sampler in args.samplers:
        for steps in args.steps:
            if (sampler, steps) in done:  # a rerun continues
                continue
            r = run(pipe, counter, sampler, steps, args.n, args.batch, args.seed)
            rows.append(r)
            print(f"{sampler:16s} steps {steps:3d}  evals {r['evaluations']:5.1f}  full {r['full']:6.1%}  "
                  f"shape {r['shape']:6.1%}  position {r['position']:6.1%}  ({r['seconds']:.0f}s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\nfewest UNet evaluations per image reaching {args.target:.0%} full match (n={args.n}):")
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        hits = sorted((r for r in rows if r["sampler"] == sampler and r["full"] >= args.target),
                      key=lambda r: r["evaluations"])
        best = f"{hits[0]['evaluations']:.0f} ({hits[0]['steps']} steps)" if hits else "not reached"
        print(f"  {sampler:16s} {best}")
    if args.plot:
        plot(rows, args.target, args.plot)
    return rows


if __name__ == "__main__":
    main()
