"""The shapes judge reads attributes back from pixels; checked on ground-truth images of the dataset."""

from __future__ import annotations

import numpy as np

from ldm.data.builtin.shapes import ShapesDataset
from ldm.eval.shapes import parse_caption, read_image, score


def _data(n=300, size=32, seed=3):
    items = list(ShapesDataset(size=size, seed=seed, length=n))
    return [np.asarray(i["image"]) for i in items], [i["caption"] for i in items]


def test_judge_reads_clean_images_perfectly():
    images, captions = _data()
    assert score(images, captions) == {"color": 1.0, "shape": 1.0, "position": 1.0, "full": 1.0, "n": 300}


def test_judge_is_robust_to_mild_noise_and_catches_wrong_captions():
    images, captions = _data()
    rng = np.random.default_rng(0)
    noisy = [np.clip(i + rng.normal(0, 8, i.shape), 0, 255).astype(np.uint8) for i in images]
    assert score(noisy, captions)["full"] >= 0.97
    swapped = [c.replace(" circle ", " square ") if " circle " in c else c.replace(" square ", " circle ")
               for c in captions]
    s = score(images, swapped)
    assert s["color"] == 1.0 and s["position"] == 1.0 and s["shape"] < 0.5


def test_blank_image_reads_as_nothing():
    blank = np.full((32, 32, 3), 30, dtype=np.uint8)
    got = read_image(blank)
    assert got.color is None and got.shape is None and got.position is None
    assert parse_caption("a purple triangle in the bottom left").position == "bottom left"
