"""Reference statistics for FID/KID: features of a shard set or image folder, saved once as an .npz.

    python -m ldm.eval.ref_stats SOURCE --out stats.npz [--inception-weights PATH] [--n N] [--batch-size N]
        [--feature-extractor NAME --weights PATH] [--device cpu]

The file holds ``mu`` and ``sigma`` (as pytorch-fid and clean-fid write them, so other tools read it), the
``features`` (for KID and precision/recall) and the protocol: ``extractor``, ``feature_layer``, ``n``, ``resize``,
``library``, ``weights``, ``source``. ``python -m ldm.eval.fid GEN stats.npz`` then skips the reference images.
Wrong input prints ``error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import torch

from ldm.devices import parse_device
from ldm.errors import ConfigError
from ldm.eval.fid import add_extractor_args, weights_arg
from ldm.eval.metrics import (
    DEFAULT_EXTRACTOR,
    STATS_SUFFIX,
    FeatureExtractor,
    count_images,
    image_size_label,
    save_stats,
)


def make_ref_stats(source: str | os.PathLike, out: str | os.PathLike, *, extractor: str = DEFAULT_EXTRACTOR,
                   weights_path: str | os.PathLike | None = None, n: int | None = None, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """Extract the features of the first ``n`` images of ``source`` (all if None) and write ``out``; returns the
    metadata written beside mu, sigma and the features."""
    if n is not None and n < 2:
        raise ConfigError(f"--n {n}: statistics need at least 2 images (a covariance)")
    if not str(out).endswith(STATS_SUFFIX):
        raise ConfigError(f"--out {out} must end in {STATS_SUFFIX}")
    available = count_images(source)
    if available < 2:
        raise ConfigError(f"{source} holds {available} image(s): statistics need at least 2")
    if n is not None and available < n:
        warnings.warn(f"{source} holds {available} images, fewer than --n {n}: using all of them", stacklevel=2)
    net = FeatureExtractor(extractor, weights_path, device)
    features = net.features(source, batch_size, limit=n)
    meta = {**net.meta, "n": len(features), "source": str(source), "image_size": image_size_label(net.image_sizes)}
    save_stats(out, features, {k: v for k, v in meta.items() if k != "n"})
    return meta


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with ``error: ...`` on stderr for wrong input)."""
    p = argparse.ArgumentParser(prog="python -m ldm.eval.ref_stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="shard set (folder with index.json, brace pattern) or image folder")
    p.add_argument("--out", required=True, help="statistics file to write (.npz)")
    p.add_argument("--n", type=int, default=None, help="use the first N images (default: all)")
    add_extractor_args(p)
    args = p.parse_args(argv)
    try:
        meta = make_ref_stats(args.source, args.out, extractor=args.feature_extractor, weights_path=weights_arg(args),
                              n=args.n, batch_size=args.batch_size, device=parse_device(args.device))
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: n={meta['n']}, {meta['library']}, {meta['extractor']} (layer {meta['feature_layer']}), "
          f"resize: {meta['resize']}, weights {meta['weights']}, images {meta['image_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
