"""Aspect-ratio buckets: the sizes at a pixel budget, each image's bucket, and the loader's batches of one size each,
every sample once per epoch, the batch count known before reading, and an exact mid-epoch resume."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from ldm.data import buckets as buckets_module
from ldm.data.buckets import BucketSpec, image_size
from ldm.data.datamodule import ShardDataModule
from ldm.data.shards import ShardWriter, write_index
from ldm.errors import ConfigError

SPEC = {"pixels": 64 * 64, "step": 16, "max_ratio": 2.0}  # buckets (48, 80), (64, 64), (80, 48)
SHAPES = [(40, 60), (50, 50), (60, 40), (30, 45), (70, 70)]  # tall, square, wide, tall, square


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """4 shards x 10 samples of images of several aspect ratios, with index.json."""
    out = tmp_path / "mixed"
    out.mkdir()
    entries = []
    for s in range(4):
        with ShardWriter(out / f"{s:06d}.tar") as w:
            for i in range(10):
                n = s * 10 + i
                buf = io.BytesIO()
                Image.new("RGB", SHAPES[n % len(SHAPES)], (n * 5 % 255, 80, 160)).save(buf, "PNG")
                w.write(f"{n:08d}", {"png": buf.getvalue(), "txt": f"image {n}".encode()})
        entries.append({"name": f"{s:06d}.tar", "count": 10})
    write_index(out, entries)
    return out


def test_bucket_sizes_keep_the_budget_the_step_and_the_ratio():
    spec = BucketSpec(pixels=256 * 256, step=64, max_ratio=2.0)
    sizes = spec.sizes()
    assert (256, 256) in sizes and (192, 320) in sizes and (320, 192) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 256 * 256 and max(w, h) / min(w, h) <= 2.0
        assert (w + 64) * h > 256 * 256 or (w, h + 64) not in sizes  # as large as the step allows
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios) and len(set(sizes)) == len(sizes)
    assert BucketSpec(**SPEC).sizes() == ((48, 80), (64, 64), (80, 48))
    small = BucketSpec(**SPEC)
    assert [small.sizes()[small.assign(*s)] for s in SHAPES] == [(48, 80), (64, 64), (80, 48), (48, 80), (64, 64)]
    assert small.assign(1000, 10) == 2 and small.assign(10, 1000) == 0  # beyond the range: the extreme buckets
    for w, h in [(33, 47), (47, 33), (64, 64)]:
        best = min(small.sizes(), key=lambda s: abs(math.log(s[0] / s[1]) - math.log(w / h)))
        assert small.sizes()[small.assign(w, h)] == best


def test_bucket_settings_are_checked():
    assert BucketSpec.from_config(None) is None
    with pytest.raises(ConfigError, match="unknown keys.*'size'"):
        BucketSpec.from_config({"size": 3})
    with pytest.raises(ConfigError, match="at least one step x step"):
        BucketSpec(pixels=100, step=16)
    with pytest.raises(ConfigError, match="max_ratio"):
        BucketSpec(max_ratio=0.5)
    with pytest.raises(ConfigError, match="needs data.source=images"):
        ShardDataModule("x", source="latents", buckets=SPEC)


def test_image_size_comes_from_the_json_or_the_header():
    buf = io.BytesIO()
    Image.new("RGB", (31, 17)).save(buf, "PNG")
    assert image_size({"png": buf.getvalue()}) == (31, 17)
    assert image_size({"png": buf.getvalue(), "json": json.dumps({"width": 640, "height": 480}).encode()}) == (640, 480)


def _epoch(dm: ShardDataModule) -> list[dict]:
    dm.setup("fit")
    return list(dm.train_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_batch_holds_one_bucket_and_every_sample_comes_once(shards, num_workers):
    dm = ShardDataModule(str(shards), batch_size=3, image_size=32, num_workers=num_workers, shuffle_buffer=4,
                         buckets=SPEC)
    batches = _epoch(dm)
    sizes = BucketSpec(**SPEC).sizes()
    for b in batches:
        h, w = b["image"].shape[-2:]
        assert (w, h) in sizes and len(b["key"]) <= 3
        for key in b["key"]:  # the bucket of the image's own aspect ratio
            want = SHAPES[int(key) % len(SHAPES)]
            assert (w, h) == sizes[BucketSpec(**SPEC).assign(*want)]
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"{n:08d}" for n in range(40)]
    assert len(batches) == len(dm.train_dataloader())  # the count the plan computed before reading
    # per worker: sum over buckets of ceil(samples / batch); a square-only loader would need 14 batches of 3
    assert len(batches) > math.ceil(40 / 3)


def test_mid_epoch_resume_with_buckets_is_exact(shards):
    kw = dict(batch_size=3, image_size=32, shuffle_buffer=4, seed=5, buckets=SPEC)
    whole = [list(b["key"]) for b in _epoch(ShardDataModule(str(shards), **kw))]
    first = ShardDataModule(str(shards), **kw)
    first.setup("fit")
    loader = first.train_dataloader()
    it = iter(loader)
    head = [list(next(it)["key"]) for _ in range(5)]
    state = loader.state_dict()
    assert state["buckets"] == [[48, 80], [64, 64], [80, 48]]
    resumed = ShardDataModule(str(shards), **kw)
    resumed.load_state_dict(state)
    assert head + [list(b["key"]) for b in _epoch(resumed)] == whole
    other = ShardDataModule(str(shards), **{**kw, "buckets": {**SPEC, "max_ratio": 3.0}})
    other.setup("fit")
    with pytest.raises(ValueError, match="layout changed.*buckets"):
        other.train_dataloader().load_state_dict(state)


def test_the_buckets_are_read_once_then_cached(shards, monkeypatch):
    _epoch(ShardDataModule(str(shards), batch_size=4, image_size=32, buckets=SPEC))

    def no_reading(raw):
        raise AssertionError("image sizes read again")

    monkeypatch.setattr(buckets_module, "image_size", no_reading)
    assert len(_epoch(ShardDataModule(str(shards), batch_size=4, image_size=32, buckets=SPEC))) > 0
