"""The MNIST judge: generate digits for "a handwritten digit {name}" prompts and read them back with the project's
digit classifier (accuracy), its features (FID-MNIST against the 5,000 real digits) and per-class pixel spread
(diversity against real digits of the same class).

    python -m ldm.eval.mnist CKPT [--classifier outputs/classifiers/mnist.pt] [--n 500] [--guidance G ...]
        [--steps N] [--sampler NAME] [--json OUT]

FID-MNIST is a Fréchet distance in the classifier's 128-d feature space, computed by torch-fidelity's statistics
functions; it is comparable only between runs judged with the same classifier file and n. ``real_floor`` is the
same distance for n real digits against the other 5,000 - n, the value a perfect generator would get at that n (none
when fewer than 129 would remain).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from ldm.data.builtin.mnist import DIGIT_NAMES, MNISTDataset, caption_for
from ldm.errors import ConfigError
from ldm.eval.digits import DigitClassifier, classify, load_classifier
from ldm.eval.generate import check_json_out, judge_samples, write_json

DEFAULT_CLASSIFIER = "outputs/classifiers/mnist.pt"


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between two feature sets [N, D] (torch-fidelity's FID math)."""
    a = fid_features_to_statistics(features_a.double())
    b = fid_features_to_statistics(features_b.double())
    return float(fid_statistics_to_metric(a, b, verbose=False)["frechet_inception_distance"])


def class_spread(images: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per class: the mean over pixels of the per-pixel std across that class's images (28x28, in [0, 1])."""
    x = DigitClassifier.prepare(images)[:, 0]
    return {c: float(x[labels == c].std(dim=0).mean()) for c in labels.unique().tolist() if (labels == c).sum() > 1}


def balanced_labels(n: int) -> list[int]:
    """``n`` prompt labels, as even over the ten digits as ``n`` allows (0, 1, ..., 9, 0, 1, ...)."""
    return [i % 10 for i in range(n)]


def real_reference(classifier: DigitClassifier) -> dict:
    """What the judge compares against, computed once per classifier: the 5,000 real digits' features and
    per-class pixel spread."""
    data = MNISTDataset()
    real = torch.from_numpy(data.images)
    _, features = classify(classifier, real)
    return {"features": features, "spread": class_spread(real, torch.from_numpy(data.labels))}


def judge_images(images: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier, seed: int = 0,
                 reference: dict | None = None) -> dict:
    """Score generated digits (uint8 [N, H, W] or [N, C, H, W]) prompted with ``labels`` [N]."""
    reference = reference or real_reference(classifier)
    real_feats = reference["features"]
    pred, feats = classify(classifier, images)
    n = len(labels)
    # the floor: n real digits against the others, disjoint (against all of them, which include the n, it read low,
    # and 0 at n = 5,000); None where fewer than the feature width would remain
    order = torch.randperm(len(real_feats), generator=torch.Generator().manual_seed(seed))
    draw, rest = order[:n], order[n:]
    floor = frechet_distance(real_feats[draw], real_feats[rest]) if len(rest) > real_feats.shape[1] else None
    per_class = {DIGIT_NAMES[c]: float((pred[labels == c] == c).float().mean()) for c in range(10)
                 if (labels == c).any()}
    gen_spread = class_spread(images, labels)
    ratios = {DIGIT_NAMES[c]: gen_spread[c] / reference["spread"][c] for c in gen_spread}
    return {
        "n": n,
        "accuracy": float((pred == labels).float().mean()),
        "accuracy_per_class": per_class,
        "fid_mnist": frechet_distance(feats, real_feats),
        "fid_mnist_real_floor": floor,
        "pixel_std_ratio": float(np.mean(list(ratios.values()))),
        "pixel_std_ratio_per_class": ratios,
    }


def _floor(value: float | None) -> str:
    return "n/a, n too close to 5,000" if value is None else f"{value:.2f}"


def evaluate(pipe, classifier: DigitClassifier, n: int = 500, guidance_scales=(None,), steps: int | None = None,
             sampler: str | None = None, seed: int = 0, batch: int = 100) -> dict:
    """Generate ``n`` digits (balanced over the classes) per guidance scale (None = the checkpoint's) and judge them."""
    if n < 20:
        raise ConfigError(f"--n {n}: the judge needs at least 2 digits per class (n >= 20)")
    labels = torch.tensor(balanced_labels(n))
    captions = [caption_for(int(c)) for c in labels]
    reference = real_reference(classifier)
    results = {}
    for scale in guidance_scales:
        t0 = time.perf_counter()
        images = judge_samples(pipe, captions, seed=seed, batch_size=batch, guidance_scale=scale,
                               num_inference_steps=steps, sampler=sampler,  # a class-conditional model: the digits'
                               class_labels=labels.tolist() if pipe.num_classes is not None else None)
        label = pipe.sampling.guidance_scale if scale is None else scale
        results[f"guidance_{label:g}"] = {**judge_images(images, labels, classifier, seed, reference),
                                          "seconds": time.perf_counter() - t0}
    return results


def main(argv: list[str] | None = None) -> dict:
    from ldm.pipeline import LatentDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--guidance", type=float, nargs="*", default=None,
                   help="guidance scales to test (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        check_json_out(args.json)  # before the models load
        classifier = load_classifier(args.classifier)
        pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
        scales = tuple(args.guidance) if args.guidance else (None,)
        results = evaluate(pipe, classifier, args.n, scales, args.steps, args.sampler, args.seed, args.batch)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for key, r in results.items():
        worst = min(r["accuracy_per_class"], key=r["accuracy_per_class"].get)
        print(f"{key}: accuracy {r['accuracy']:.1%} (lowest: {worst} {r['accuracy_per_class'][worst]:.0%})  "
              f"fid_mnist {r['fid_mnist']:.2f} (real digits at this n: {_floor(r['fid_mnist_real_floor'])})  "
              f"pixel std vs real {r['pixel_std_ratio']:.2f}  (n={r['n']}, {r['seconds']:.0f}s)")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
