"""The shapes judge reads attributes back from pixels; checked on ground-truth images of the dataset."""

from __future__ import annotations

import numpy as np
import torch

from ldm.data.builtin.shapes import BACKGROUND, COLORS, ShapesDataset, draw_shape
from ldm.eval.shapes import judge_palette, parse_caption, random_captions, read_image, score


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


def test_a_faint_fringe_around_a_bright_shape_is_not_part_of_it():
    # A decoder's ringing leaves such fringes; counted as shape, they widened the box of white squares into circles.
    clean = np.asarray(draw_shape(32, "square", "white", (9.0, 9.0), 8.0)).astype(np.float32)
    ys, xs = np.nonzero(np.abs(clean - np.array(BACKGROUND)).sum(-1) > 0)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fringed = clean.copy()
    faint = np.array(BACKGROUND) + 0.3 * (np.array(COLORS["white"]) - np.array(BACKGROUND))
    fringed[y0 - 1, x0:x0 + 2] = faint  # a few pixels above the top side and right of the right side
    fringed[y1 - 2:y1 + 1, x1 + 1] = faint
    got = read_image(fringed.astype(np.uint8))
    assert (got.color, got.shape, got.position) == ("white", "square", "top left")
    half = np.where((clean != np.array(BACKGROUND)).any(-1, keepdims=True), 0.5 * (clean + np.array(BACKGROUND)), clean)
    assert read_image(half.astype(np.uint8)).shape == "square"  # a shape drawn at half contrast is all foreground


def test_the_judge_reads_an_extra_colour_only_when_its_palette_has_it():
    items = list(ShapesDataset(size=32, seed=5, length=60, colors=["cyan", "green", "blue"]))
    images, captions = [np.asarray(i["image"]) for i in items], [i["caption"] for i in items]
    palette = judge_palette(["cyan"])
    assert list(palette)[:len(COLORS)] == list(COLORS) and "cyan" in palette
    assert score(images, captions, palette)["full"] == 1.0
    plain = score(images, captions)  # without cyan, cyan shapes read as another colour
    n_cyan = sum(" cyan " in c for c in captions)
    assert 0 < n_cyan < 60 and plain["color"] == 1 - n_cyan / 60
    drawn = random_captions(50, seed=0, colors=["cyan"])
    assert len(drawn) == 50 and all(c.startswith("a cyan ") for c in drawn)
    assert random_captions(20, seed=3) == random_captions(20, seed=3, colors=list(COLORS))


class _Posterior:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class _LosslessVAE(torch.nn.Module):
    """Encodes an image as itself; ``blur`` > 1 decodes through an average pool of that size instead."""

    def __init__(self, blur: int = 1):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # for the judge's device lookup
        self.blur = blur

    def encode(self, x):
        return _Posterior(x)

    def decode(self, z):
        if self.blur == 1:
            return z
        return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z, self.blur), scale_factor=self.blur)


def test_the_reconstruction_judge_charges_the_vae_only_with_what_it_loses():
    from ldm.eval.shapes import vae_reconstructions

    lossless = vae_reconstructions(_LosslessVAE(), size=32, n=200)
    assert {k: lossless[k] for k in ("full", "color", "shape", "position", "n")} == {
        "full": 1.0, "color": 1.0, "shape": 1.0, "position": 1.0, "n": 200}
    # 4 x 4 blocks keep where a shape is but not its outline
    blocky = vae_reconstructions(_LosslessVAE(blur=4), size=32, n=200)
    assert blocky["position"] > 0.95 and blocky["shape"] < 0.85 and blocky["full"] < 0.8


def test_a_count_or_batch_below_one_is_refused_before_the_checkpoint_loads(capsys):
    """``--n 0`` and ``--batch 0`` exit 2 naming the flag (the checkpoint is never read); the API raises."""
    import pytest

    from ldm.errors import ConfigError
    from ldm.eval import shapes, shapes_inpaint

    for module in (shapes, shapes_inpaint):
        for flag, value in (("--n", "0"), ("--n", "-3"), ("--batch", "0")):
            with pytest.raises(SystemExit) as exit_:
                module.main(["/nowhere.ckpt", flag, value])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and f"{flag} must be a positive integer, got {value}" in err
        with pytest.raises(ConfigError, match="--n must be a positive integer, got 0"):
            module.evaluate(None, n=0)


def test_a_wrong_checkpoint_or_json_path_exits_2_with_one_line_not_a_traceback(tmp_path, capsys):
    """A checkpoint that does not load (here: none at the path) is the pipeline's ConfigError, printed as ``error:
    ...`` with exit 2; a ``--json`` whose folder does not exist is refused before the checkpoint loads, not after
    the whole evaluation; ``--margin`` beyond [0, 0.5) would mask everything (NaN figures) and is refused too."""
    import pytest

    from ldm.eval import shapes, shapes_inpaint

    missing = tmp_path / "missing.ckpt"
    for module in (shapes, shapes_inpaint):
        with pytest.raises(SystemExit) as exit_:
            module.main([str(missing), "--n", "2"])
        assert exit_.value.code == 2 and f"error: no checkpoint at {missing}" in capsys.readouterr().err
        figures = tmp_path / "no_such_folder" / "figures.json"
        with pytest.raises(SystemExit) as exit_:
            module.main([str(missing), "--json", str(figures)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"--json {figures}: the folder {figures.parent} does not exist" in err
    for margin in ("0.7", "-0.1", "nan"):
        with pytest.raises(SystemExit) as exit_:
            shapes_inpaint.main([str(missing), "--margin", margin])
        assert exit_.value.code == 2 and "--margin must lie in [0, 0.5)" in capsys.readouterr().err
