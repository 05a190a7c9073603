"""The shapes built-in: exact colours, background, shape kind, position, caption grammar, determinism."""

import random
import re

import numpy as np
import pytest

from ldm.data.builtin.shapes import (
    BACKGROUND,
    COLORS,
    EXTRA_COLORS,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    random_caption,
)

CAPTION = re.compile(r"^a (\w+) (circle|square|triangle) in the (top left|top right|bottom left|bottom right|center)$")


@pytest.fixture(scope="module")
def items():
    ds = ShapesDataset(size=64, seed=3, length=150)
    return [ds[i] for i in range(len(ds))]


def test_tables_are_the_spec():
    assert COLORS == {
        "red": (220, 40, 40),
        "green": (40, 180, 60),
        "blue": (40, 80, 220),
        "yellow": (230, 210, 40),
        "purple": (150, 60, 200),
        "orange": (240, 140, 30),
        "white": (240, 240, 240),
    }
    assert BACKGROUND == (30, 30, 30)
    assert SHAPES == ("circle", "square", "triangle")
    assert set(POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}


def test_caption_grammar_and_attributes(items):
    for it in items:
        m = CAPTION.match(it["caption"])
        assert m, it["caption"]
        assert m.groups() == (it["color"], it["shape"], it["position"])
        assert it["color"] in COLORS
    # every colour, shape and position occurs
    assert {it["color"] for it in items} == set(COLORS)
    assert {it["shape"] for it in items} == set(SHAPES)
    assert {it["position"] for it in items} == set(POSITIONS)


def test_pixels_exact_colour_background_position_and_shape(items):
    for it in items:
        img = np.asarray(it["image"])
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        cx, cy = it["center"]
        assert tuple(img[int(cy), int(cx)]) == COLORS[it["color"]]  # exact colour at the shape centre
        is_bg = (img == BACKGROUND).all(-1)
        is_fg = (img == COLORS[it["color"]]).all(-1)
        assert (is_bg | is_fg).all()  # no other colour anywhere: constant background, one flat shape
        ys, xs = np.nonzero(is_fg)
        com = np.array([xs.mean(), ys.mean()]) / 64
        nearest = min(POSITIONS, key=lambda p: float(np.hypot(*(np.array(POSITIONS[p]) - com))))
        assert nearest == it["position"]
        # shape kind from the fill ratio of its bounding box: square 1, circle pi/4, triangle 1/2
        ratio = is_fg.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[it["shape"]]
        assert abs(ratio - expected) < 0.09, (it["shape"], ratio)
        extent = it["extent"] / 64
        assert 0.25 <= extent <= 0.4
        fx, fy = POSITIONS[it["position"]]
        assert abs(cx / 64 - fx) <= 1 / 16 + 1e-9 and abs(cy / 64 - fy) <= 1 / 16 + 1e-9


def test_triangle_apex_up():
    ds = ShapesDataset(size=64, seed=0, length=60)
    tri = next(ds[i] for i in range(60) if ds[i]["shape"] == "triangle")
    fg = (np.asarray(tri["image"]) != BACKGROUND).any(-1)
    rows = fg.sum(1)
    ys = np.nonzero(rows)[0]
    assert rows[ys[0]] < rows[ys[-1]]  # narrow on top, wide at the bottom


def test_deterministic_per_index_and_seed():
    a = ShapesDataset(size=32, seed=1, length=20)
    b = ShapesDataset(size=32, seed=1, length=20)
    forward = [a[i]["image"].tobytes() for i in range(20)]
    backward = [b[i]["image"].tobytes() for i in reversed(range(20))][::-1]
    assert forward == backward
    assert [it["caption"] for it in a] == [b[i]["caption"] for i in range(20)]
    c = ShapesDataset(size=32, seed=2, length=20)
    assert [c[i]["image"].tobytes() for i in range(20)] != forward
    assert a[-1]["caption"] == a[19]["caption"]
    with pytest.raises(IndexError):
        a[20]


def test_random_caption():
    rng = random.Random(0)
    caps = {random_caption(rng) for _ in range(200)}
    assert all(CAPTION.match(c) for c in caps) and len(caps) > 50


def test_colors_option_draws_extra_colours_and_keeps_the_default_items():
    default = ShapesDataset(size=32, seed=4, length=30)
    explicit = ShapesDataset(size=32, seed=4, length=30, colors=list(COLORS))
    assert [default[i]["image"].tobytes() for i in range(30)] == [explicit[i]["image"].tobytes() for i in range(30)]
    assert "cyan" not in COLORS and "cyan" in EXTRA_COLORS  # the default dataset never shows it
    mixed = ShapesDataset(size=32, seed=4, length=200, colors=[*COLORS, "cyan"])
    cyan = [it for it in mixed if it["color"] == "cyan"]
    assert 10 < len(cyan) < 50  # about 1 in 8
    item = cyan[0]
    assert item["caption"].startswith("a cyan ")
    x, y = (int(v) for v in item["center"])
    assert np.asarray(item["image"])[y, x].tolist() == list(EXTRA_COLORS["cyan"])
    assert {it["color"] for it in ShapesDataset(length=20, colors=["cyan"])} == {"cyan"}
    for bad in (["teal"], [], "cyan"):
        with pytest.raises(ValueError, match="colou?r"):
            ShapesDataset(colors=bad)


def test_make_shards_writes_the_chosen_colours(tmp_path):
    import tarfile

    from ldm.data.make_shards import main, make_shards
    from ldm.errors import ConfigError

    assert main(["shapes", str(tmp_path / "s"), "--length", "16", "--maxcount", "8", "--colors", "cyan", "red"]) == 0
    captions = []
    for shard in sorted((tmp_path / "s").glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert len(captions) == 16 and {c.split()[1] for c in captions} == {"cyan", "red"}
    with pytest.raises(ConfigError, match="unknown shapes colours"):
        make_shards("shapes", tmp_path / "t", length=4, colors=["teal"], log=None)
    with pytest.raises(ConfigError, match="shapes dataset only"):
        make_shards("mnist", tmp_path / "u", length=4, colors=["red"], log=None)
