"""FID (and KID, precision/recall) of generated images against a reference set, by torch-fidelity on local weights.

    python -m ldm.eval.fid GEN REF [--inception-weights PATH] [--kid] [--prc] [--kid-subset-size N]
        [--batch-size N] [--feature-extractor NAME --weights PATH] [--device cpu]

GEN and REF are image folders (recursive), shard sets (a folder of .tar with index.json, or a brace pattern) or, for
REF, a statistics .npz (python -m ldm.eval.ref_stats writes one with features; a pytorch-fid / clean-fid file with
only mu and sigma serves FID alone). Weights come from the flag or LDM_INCEPTION_WEIGHTS (LDM_CLIP_WEIGHTS,
LDM_DINOV2_WEIGHTS for other extractors); nothing is downloaded. The first lines give n and the protocol; the last
line is ``fid=<value>``, with `` kid=<mean>±<std>`` appended under --kid. Wrong input prints ``error: ...`` on
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ldm.devices import parse_device
from ldm.errors import ConfigError
from ldm.eval.metrics import DEFAULT_EXTRACTOR, compute_metrics


def add_extractor_args(p: argparse.ArgumentParser) -> None:
    """The weights and extractor flags shared with ref_stats."""
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: $LDM_INCEPTION_WEIGHTS)")
    p.add_argument("--feature-extractor", default=DEFAULT_EXTRACTOR, metavar="NAME",
                   help=f"torch-fidelity extractor: {DEFAULT_EXTRACTOR} (default), clip-vit-b-32, ...")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="weights of --feature-extractor (default: --inception-weights for Inception, else "
                        "$LDM_CLIP_WEIGHTS / $LDM_DINOV2_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="torch device for the extractor (cpu, cuda, cuda:1, ...)")


def weights_arg(args: argparse.Namespace) -> str | None:
    """--weights, else --inception-weights when the extractor is Inception."""
    if args.weights:
        return args.weights
    return args.inception_weights if args.feature_extractor == DEFAULT_EXTRACTOR else None


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with ``error: ...`` on stderr for wrong input)."""
    p = argparse.ArgumentParser(prog="python -m ldm.eval.fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gen", help="generated images: folder or shards")
    p.add_argument("ref", help="reference: folder, shards or statistics .npz")
    p.add_argument("--kid", action="store_true", help="also Kernel Inception Distance (mean ± std over subsets)")
    p.add_argument("--prc", action="store_true", help="also precision and recall (k=3 neighbourhoods)")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID subset size (default 1000; clamped to the smaller set)")
    add_extractor_args(p)
    args = p.parse_args(argv)
    try:
        m = compute_metrics(args.gen, args.ref, extractor=args.feature_extractor, weights_path=weights_arg(args),
                            fid=True, kid=args.kid, prc=args.prc, kid_subset_size=args.kid_subset_size,
                            batch_size=args.batch_size, device=parse_device(args.device))
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"gen: {args.gen} (n={m['n_gen']})")
    print(f"ref: {args.ref} (n={m['n_ref'] if m['n_ref'] >= 0 else 'unknown'})")
    print(f"protocol: {m.protocol()}")
    if args.prc:
        print(f"precision={m['precision']:.6g} recall={m['recall']:.6g}")
    line = f"fid={m['fid']:.6g}"
    if args.kid:
        line += f" kid={m['kid_mean']:.6g}±{m['kid_std']:.6g}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
