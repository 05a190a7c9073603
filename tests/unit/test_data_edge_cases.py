"""Edge cases of the data pipeline found in review: EXIF-rotated photos, interrupted make_shards / cache_latents
runs, cache reruns, latent-cache augmentation settings, caption files with a BOM, palette / 1-bit / 16-bit images,
reader settings and built-in shards whose settings changed."""

from __future__ import annotations

import io
import json
import random
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ldm.data import make_shards as ms
from ldm.data.buckets import image_size
from ldm.data.cache_latents import cache_latents
from ldm.data.datamodule import ShardDataModule
from ldm.data.shards import iter_shard, read_index, resolve_shards
from ldm.data.transforms import ImageTransform, SampleDecoder, decode_image, eight_bit
from ldm.errors import ConfigError


def _rotated_jpeg(path: Path, orientation: int = 6) -> None:
    """32 wide x 16 high as stored, left half red, right half blue; EXIF says how to turn it upright."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (255, 0, 0)
    a[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=100, exif=exif)


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


# ---------------------------------------------------------------------------------------------- EXIF orientation


def test_decode_image_applies_exif_orientation_as_pil_exif_transpose(tmp_path):
    _rotated_jpeg(tmp_path / "phone.jpg")
    data = (tmp_path / "phone.jpg").read_bytes()
    ours = decode_image(data)
    oracle = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert ours.size == oracle.size == (16, 32)
    assert np.array_equal(np.asarray(ours), np.asarray(oracle))
    assert ours.getpixel((8, 2))[0] > 200 and ours.getpixel((8, 29))[2] > 200  # red on top, blue at the bottom


@pytest.mark.parametrize("size", [None, 16])
def test_make_shards_writes_rotated_photos_upright(tmp_path, size):
    src = tmp_path / "src"
    src.mkdir()
    _rotated_jpeg(src / "phone.jpg")
    (src / "phone.txt").write_text("a phone photo")
    ms.make_shards(src, tmp_path / "out", maxcount=10, size=size, log=None)
    (data,) = [v for k, v in _members(tmp_path / "out" / "000000.tar").items() if k.endswith((".jpg", ".png"))]
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif().get(0x0112, 1) == 1  # no tag left for a reader to apply twice (or to ignore)
    assert stored.size == (16, 32)
    rgb = np.asarray(stored.convert("RGB"), dtype=int)
    assert rgb[2, 8, 0] > 200 and rgb[-3, 8, 2] > 200


def test_make_shards_keeps_the_bytes_of_an_upright_jpeg(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _rotated_jpeg(src / "a.jpg", orientation=1)
    (src / "a.txt").write_text("upright")
    ms.make_shards(src, tmp_path / "out", maxcount=10, log=None)
    members = _members(tmp_path / "out" / "000000.tar")
    assert members["00000000.jpg"] == (src / "a.jpg").read_bytes()


@pytest.mark.parametrize("orientation,expected", [(1, (32, 16)), (3, (32, 16)), (6, (16, 32)), (8, (16, 32))])
def test_bucket_image_size_is_the_displayed_size(tmp_path, orientation, expected):
    _rotated_jpeg(tmp_path / "p.jpg", orientation)
    raw = {"__key__": "p", "jpg": (tmp_path / "p.jpg").read_bytes()}
    assert image_size(raw) == expected == decode_image(raw["jpg"]).size


# ---------------------------------------------------------------------------------------------- interrupted runs


def test_an_unfinished_make_shards_folder_is_refused_until_rerun(tmp_path):
    out = tmp_path / "out"
    ms.make_shards("shapes", out, maxcount=4, size=8, length=12, log=None)
    (out / "index.json").unlink()  # as a run killed before its last shard leaves it
    (out / "000002.tar").unlink()
    with pytest.raises(ConfigError, match="rerun the make_shards command to finish it") as err:
        resolve_shards(out)
    assert str(out) in str(err.value)
    ms.make_shards("shapes", out, maxcount=4, size=8, length=12, log=None)  # the rerun finishes it
    assert resolve_shards(out)[1] == [4, 4, 4]


def test_an_unfinished_cache_latents_folder_is_refused(tmp_path):
    out = tmp_path / "cache"
    ms.make_shards("shapes", out, maxcount=4, size=8, length=8, log=None)
    (out / "_stats" / "run.json").unlink()
    (out / "index.json").unlink()
    (out / "cache_settings.json").write_text("{}")
    with pytest.raises(ConfigError, match="rerun the cache_latents command to finish it"):
        resolve_shards(out)


def test_a_plain_folder_of_foreign_tars_still_reads(tmp_path):
    import webdataset as wds

    (tmp_path / "own").mkdir()
    for s in range(2):
        with wds.TarWriter(str(tmp_path / "own" / f"part{s}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"s{s}_{i}", "txt": b"x"})
    paths, counts = resolve_shards(tmp_path / "own")
    assert [Path(p).name for p in paths] == ["part0.tar", "part1.tar"] and counts == [3, 3]


# ---------------------------------------------------------------------------------------------- cache_latents rerun


class _PoolVAE(torch.nn.Module):
    """A 4x-downsampling "VAE": mean = 4x4 average pool, std = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        m = torch.nn.functional.avg_pool2d(x, 4) * self.w
        return SimpleNamespace(mean=m, std=torch.ones_like(m))


@pytest.mark.parametrize("index_shape", [True, False])
def test_rerunning_cache_latents_keeps_the_latent_shape(tmp_path, index_shape):
    ms.make_shards("shapes", tmp_path / "s", maxcount=4, size=16, length=8, log=None)
    cache = tmp_path / "c"
    cache_latents(tmp_path / "s", cache, _PoolVAE(), image_size=16, log=None)
    assert read_index(cache)["latents"]["shape"] == [3, 4, 4]
    if not index_shape:  # an index an earlier (buggy) rerun left without a shape: read from a cached sample
        index = read_index(cache)
        index["latents"]["shape"] = None
        (cache / "index.json").write_text(json.dumps(index))
    cache_latents(tmp_path / "s", cache, _PoolVAE(), image_size=16, log=None)  # every shard reused
    assert read_index(cache)["latents"]["shape"] == [3, 4, 4]


def test_another_dataset_is_not_cached_into_a_folder_holding_one(tmp_path):
    """A second dataset of the same layout cached into the same folder kept the first one's latents (every shard name
    was "already cached")."""
    for name, seed in (("a", 0), ("b", 1)):
        ms.make_shards("shapes", tmp_path / name, maxcount=4, size=16, length=8, seed=seed, log=None)
    cache = tmp_path / "c"
    cache_latents(tmp_path / "a", cache, _PoolVAE(), image_size=16, log=None)
    cache_latents(tmp_path / "a", cache, _PoolVAE(), image_size=16, log=None)  # the same data again: reused
    with pytest.raises(ConfigError, match=r"holds latents cached with other settings \(source "):
        cache_latents(tmp_path / "b", cache, _PoolVAE(), image_size=16, log=None)


# ---------------------------------------------------------------------------------------------- latent augmentation


@pytest.mark.parametrize("crop,hflip", [("random", False), ("center", True), ("random", True)])
def test_augmentation_on_a_latent_cache_is_refused(crop, hflip):
    with pytest.raises(ConfigError, match="would augment nothing. Set data.crop=center data.hflip=false"):
        ShardDataModule("unused", source="latents", crop=crop, hflip=hflip)
    ShardDataModule("unused", source="images", crop=crop, hflip=hflip)  # images: augmented per step, accepted
    ShardDataModule("unused", source="latents", crop="center", hflip=False)


# ---------------------------------------------------------------------------------------------- caption files


def _three_images(src: Path) -> None:
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(src / f"img{i}.png")


@pytest.mark.parametrize("files", [
    {"captions.json": json.dumps({"img0.png": "zero", "img1.png": "one", "img2.png": "two"})},
    {"captions.jsonl": "".join(json.dumps({"file": f"img{i}.png", "caption": c}) + "\n"
                               for i, c in enumerate(("zero", "one", "two")))},
    {"captions.csv": "img0.png,zero\nimg1.png,one\nimg2.png,two\n"},
    {"img0.txt": "zero", "img1.txt": "one", "img2.txt": "two"},
], ids=["json", "jsonl", "csv", "txt"])
def test_caption_files_with_a_utf8_bom_read_as_without(tmp_path, files):
    src = tmp_path / "src"
    _three_images(src)
    for name, text in files.items():
        (src / name).write_text(text, encoding="utf-8-sig")
    report = ms.make_shards(src, tmp_path / "out", log=None)
    assert report.written == 3 and not report.skipped
    assert [s["txt"].decode() for s in iter_shard(tmp_path / "out" / "000000.tar")] == ["zero", "one", "two"]


@pytest.mark.parametrize("name,text", [
    ("captions.json", '{"img0.png": "zero",'),
    ("captions.json", '"just a string"'),
    ("captions.json", '["img0.png"]'),
    ("captions.csv", b"img0.png,\xff\xfe\n"),
])
def test_a_malformed_caption_file_is_a_config_error_naming_it(tmp_path, name, text):
    src = tmp_path / "src"
    _three_images(src)
    if isinstance(text, bytes):
        (src / name).write_bytes(text)
    else:
        (src / name).write_text(text)
    with pytest.raises(ConfigError, match=f"{name} is not a valid caption file"):
        ms.make_shards(src, tmp_path / "out", log=None)


# ---------------------------------------------------------------------------------------------- image modes


def _checkerboard() -> np.ndarray:
    return (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["P", "1"])
def test_palette_and_one_bit_images_are_filtered_when_resized(tmp_path, mode):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(_checkerboard()).convert(mode).save(src / "chk.png")
    (src / "chk.txt").write_text("a checkerboard")
    ms.make_shards(src, tmp_path / "out", size=16, log=None)
    (data,) = [v for k, v in _members(tmp_path / "out" / "000000.tar").items() if k.endswith(".png")]
    ours = np.asarray(decode_image(data).convert("L"), dtype=float)
    oracle = np.asarray(Image.fromarray(_checkerboard()).resize((16, 16), Image.Resampling.LANCZOS), dtype=float)
    assert ours.shape == (16, 16)
    assert np.abs(ours - oracle).max() <= 2  # grey, as Lanczos on L gives; not all black (nearest neighbour)


def test_sixteen_bit_greys_are_scaled_when_written_as_jpeg(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(src / "g16.png")
    (src / "g16.txt").write_text("a ramp")
    ms.make_shards(src, tmp_path / "out", fmt="jpg", log=None)
    (data,) = [v for k, v in _members(tmp_path / "out" / "000000.tar").items() if k.endswith(".jpg")]
    ours = np.asarray(decode_image(data).convert("L"), dtype=float)
    expected = np.asarray(eight_bit(Image.fromarray(ramp)), dtype=float)  # the reader's own 8-bit view
    assert abs(ours.mean() - expected.mean()) < 2 and len(np.unique(ours)) > 200  # not clipped to white


# ---------------------------------------------------------------------------------------------- reader settings


@pytest.mark.parametrize("mode", ["rgb", "I;16", "CMYK", ""])
def test_a_wrong_image_mode_is_refused_when_the_reader_is_built(mode):
    with pytest.raises(ConfigError, match="use one of RGB, L, RGBA, LA"):
        ShardDataModule("unused", image_mode=mode)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_caption_field_missing_from_the_json_warns_once_naming_the_fields():
    decoder = SampleDecoder(ImageTransform(size=8), caption_field="captoin")
    raws = [{"__key__": f"s{i}", "png": _png(), "json": json.dumps({"caption": "c", "color": "red"}).encode()}
            for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [decoder(r, random.Random(0)) for r in raws]
    assert [o["caption"] for o in outs] == ["", "", ""]
    assert len(caught) == 1
    assert "'captoin'" in str(caught[0].message) and "['caption', 'color']" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a field that is there: no warning
        present = SampleDecoder(ImageTransform(size=8), caption_field="color")
        assert present(raws[0], random.Random(0))["caption"] == "red"


@pytest.mark.parametrize("member", [{"json": json.dumps({"label": "cat"}).encode()}, {"cls": b"cat"}])
def test_a_label_that_is_not_an_integer_keeps_the_sample_without_a_label(tmp_path, member):
    import webdataset as wds

    (tmp_path / "own").mkdir()
    with wds.TarWriter(str(tmp_path / "own" / "000000.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"s{i}", "png": _png(), "txt": b"a cat", **member})
    dm = ShardDataModule(str(tmp_path / "own" / "000000.tar"), batch_size=4, image_size=8, shuffle_buffer=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["caption"] == ["a cat"] * 4 and "label" not in batch
    messages = [str(c.message) for c in caught]
    assert sum("'cat'" in m and "not an integer" in m for m in messages) == 1
    assert not any("delete that shard" in m for m in messages)


def test_integer_labels_still_read():
    decoder = SampleDecoder(ImageTransform(size=8))
    raw = {"__key__": "s", "png": _png(), "json": json.dumps({"label": 3}).encode()}
    assert decoder(raw, random.Random(0))["label"] == 3
    assert decoder({"__key__": "t", "png": _png(), "cls": b"7\n"}, random.Random(0))["label"] == 7


# ---------------------------------------------------------------------------------------------- docs of data=folder


def test_the_folder_config_and_its_docs_agree_on_flipping():
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2]
    cfg = OmegaConf.load(root / "conf" / "data" / "folder.yaml")
    assert cfg.hflip is False
    for text in ((root / "docs" / "data.md").read_text(), (root / "conf" / "data" / "folder.yaml").read_text()):
        assert "crops and flips at random" not in text and "random crops and flips are drawn" not in text


# ---------------------------------------------------------------------------------------------- built-in settings


def test_make_shards_refuses_a_rerun_with_other_colors(tmp_path):
    ms.make_shards("shapes", tmp_path / "a", maxcount=10, size=8, length=10, log=None)
    assert json.loads((tmp_path / "a" / "_stats" / "run.json").read_text())["colors"] is None
    with pytest.raises(ConfigError, match=r"colors None -> \['cyan'\]"):
        ms.make_shards("shapes", tmp_path / "a", maxcount=10, size=8, length=10, log=None, colors=["cyan"])


def test_make_shards_refuses_an_out_folder_holding_shards_it_did_not_record(tmp_path):
    """Shards copied in (or another tool's) were counted as "already complete" and indexed as this run's."""
    ms.make_shards("shapes", tmp_path / "a", maxcount=10, size=8, length=10, log=None)
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "000000.tar").write_bytes((tmp_path / "a" / "000000.tar").read_bytes())
    with pytest.raises(ConfigError, match=r"holds shards \(000000.tar, ...\) that no make_shards run recorded"):
        ms.make_shards("shapes", foreign, maxcount=10, size=8, length=10, log=None)
    assert not (foreign / "index.json").exists()


def test_a_run_record_without_colors_reads_as_the_default(tmp_path):
    ms.make_shards("shapes", tmp_path / "a", maxcount=10, size=8, length=10, log=None)
    record = tmp_path / "a" / "_stats" / "run.json"
    run = json.loads(record.read_text())
    del run["colors"]  # as make_shards wrote it before it recorded colours
    record.write_text(json.dumps(run))
    assert ms.make_shards("shapes", tmp_path / "a", maxcount=10, size=8, length=10, log=None).shards_reused == 1
    ShardDataModule(str(tmp_path / "a"), image_size=8,
                    builtin={"source": "shapes", "length": 10, "size": 8, "maxcount": 10}).prepare_data()


@pytest.mark.parametrize("change", [{"length": 20}, {"colors": ["cyan"]}, {"seed": 1}, {"size": 16}])
def test_prepare_data_refuses_builtin_shards_made_with_other_settings(tmp_path, change):
    out = tmp_path / "shapes"
    base = {"source": "shapes", "length": 10, "size": 8, "maxcount": 10}
    ShardDataModule(str(out), image_size=8, builtin=base).prepare_data()
    ShardDataModule(str(out), image_size=8, builtin=base).prepare_data()  # the same settings: reused
    with pytest.raises(ConfigError, match="another data.train_shards") as err:
        ShardDataModule(str(out), image_size=8, builtin={**base, **change}).prepare_data()
    assert str(out) in str(err.value) and next(iter(change)) in str(err.value)


def test_prepare_data_takes_defaults_for_what_they_stand_for(tmp_path):
    out = tmp_path / "shapes"
    ms.make_shards("shapes", out, maxcount=10, size=None, length=10, log=None)  # size None: 32 px
    ShardDataModule(str(out), image_size=32,
                    builtin={"source": "shapes", "length": 10, "size": 32, "maxcount": 10}).prepare_data()
