"""The shapes inpainting judge: its held-out cases, its kept-pixel figures, and its loop on a perfect inpainter."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ldm.data.builtin.shapes import BACKGROUND, COLORS
from ldm.eval.shapes import parse_caption
from ldm.eval.shapes_inpaint import HELD_OUT_SEED, evaluate, grow, inpaint_cases, kept_pixels


def test_cases_mask_the_whole_shape_and_ask_for_another_colour():
    images, masks, captions = inpaint_cases(40, 32)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8 and masks.shape == (40, 32, 32)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    shape_pixels = np.any(images != np.array(BACKGROUND, dtype=np.uint8), axis=-1)
    assert np.all(masks[shape_pixels] == 1)  # every shape pixel is repainted
    assert 0.05 < masks.mean() < 0.4  # and most of the background is kept
    from ldm.data.builtin.shapes import ShapesDataset

    for item, caption in zip(ShapesDataset(size=32, seed=HELD_OUT_SEED, length=40), captions, strict=True):
        want = parse_caption(caption)
        assert want.color != item["color"] and want.color in COLORS
        assert (want.shape, want.position) == (item["shape"], item["position"])
    again = inpaint_cases(40, 32)
    assert np.array_equal(again[1], masks) and again[2] == captions
    wider = inpaint_cases(40, 32, margin=0.15)[1]
    assert wider.sum() > masks.sum()


def test_kept_pixels_counts_only_the_unmasked_region():
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    masks = np.zeros((2, 8, 8), dtype=np.float32)
    masks[:, :4] = 1
    assert kept_pixels(inputs, inputs, masks, 4) == {"mae": 0.0, "within": 1.0}
    out = inputs.astype(np.int16)
    out[:, :4] = 255 - out[:, :4]  # anything inside the mask is ignored
    out[0, 4, 0, 0] = np.clip(out[0, 4, 0, 0] + 100, 0, 255) if out[0, 4, 0, 0] < 155 else out[0, 4, 0, 0] - 100
    got = kept_pixels(out.astype(np.uint8), inputs, masks, 4)
    assert got["within"] == 1 - 1 / 64  # one of 64 kept pixels is off
    assert abs(got["mae"] - 100 / (64 * 3)) < 1e-6


def test_grow_dilates_by_a_square_neighbourhood():
    m = np.zeros((1, 7, 7), dtype=np.float32)
    m[0, 3, 3] = 1
    assert grow(m, 0).sum() == 1 and grow(m, 1).sum() == 9 and grow(m, 2)[0, 1:6, 1:6].all()
    edge = np.zeros((1, 4, 4), dtype=np.float32)
    edge[0, 0, 0] = 1
    assert grow(edge, 1).sum() == 4  # clipped at the image border, no wrap-around


class PerfectInpainter:
    """Recolours the shape pixels of the input with the caption's colour: what an ideal inpainting model gives."""

    sampling = SimpleNamespace(image_size=32, guidance_scale=5.0)
    vae = None

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, prompts, image, mask_image, **kwargs):
        self.calls.append({"n": len(prompts), **kwargs})
        x = ((image + 1) * 127.5).round()
        background = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None]
        shape = (x - background).abs().amax(dim=1, keepdim=True) > 0
        assert bool((mask_image[shape[:, 0][:, None]] == 1).all())
        colours = torch.tensor([COLORS[parse_caption(p).color] for p in prompts], dtype=torch.float32)[:, :, None, None]
        return torch.where(shape, colours, x) / 127.5 - 1


def test_evaluate_scores_a_perfect_inpainter_perfectly():
    pipe = PerfectInpainter()
    r = evaluate(pipe, n=30, batch=16, guidance_scale=3.0, steps=7)
    assert (r["full"], r["color"], r["shape"], r["position"], r["n"]) == (1.0, 1.0, 1.0, 1.0, 30)
    assert r["kept"] == r["kept_away"] == {"mae": 0.0, "within": 1.0} and r["vae_floor"] is None
    assert [c["n"] for c in pipe.calls] == [16, 14]
    assert all(c["strength"] == 1.0 and c["num_inference_steps"] == 7 and c["guidance_scale"] == 3.0
               for c in pipe.calls)
    assert r["guidance_scale"] == 3.0 and 0 < r["masked_fraction"] < 0.4
