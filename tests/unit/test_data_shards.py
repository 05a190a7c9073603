"""make_shards: builtin and folder sources, caption files, corrupt images, missing captions, killed runs."""

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import make_shards as ms
from ldm.data.shards import ShardWriter, expand_braces, iter_shard, read_index, resolve_shards, sample_key
from ldm.data.transforms import decode_image
from ldm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _tars(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tar"))


def _folder(tmp_path: Path, n: int = 6, captions: str = "txt") -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    table = {}
    for i in range(n):
        rel = f"sub/img{i}.png" if i % 2 else f"img{i}.png"
        Image.new("RGB", (40, 30), (i * 20, 100, 50)).save(src / rel)
        table[rel] = f"caption number {i}"
        if captions == "txt":
            (src / rel).with_suffix(".txt").write_text(f"caption number {i}\n")
    if captions == "json":
        (src / "captions.json").write_text(json.dumps(table))
    elif captions == "jsonl":
        (src / "captions.jsonl").write_text("\n".join(json.dumps({"file": k, "text": v}) for k, v in table.items()))
    elif captions == "csv":
        with open(src / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "caption"])
            w.writerows(table.items())
    return src


def test_helpers():
    assert expand_braces("d/{08..10}.tar") == ["d/08.tar", "d/09.tar", "d/10.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert sample_key("x/000001.latent_mean.npy") == ("x/000001", "latent_mean.npy")


def test_builtin_shapes_shards(tmp_path):
    out = tmp_path / "out"
    report = ms.make_shards("shapes", out, maxcount=10, length=25, size=16, log=None)
    assert report.written == 25 and _tars(out) == ["000000.tar", "000001.tar", "000002.tar"]
    index = read_index(out)
    assert [s["count"] for s in index["shards"]] == [10, 10, 5] and index["total"] == 25
    with tarfile.open(out / "000000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["00000000.json", "00000000.png", "00000000.txt"]  # webdataset's TarWriter sorts a sample's
    samples = list(iter_shard(out / "000002.tar"))
    assert len(samples) == 5 and samples[0]["__key__"] == "00000020"
    meta = json.loads(samples[0]["json"])
    caption = f"a {meta['color']} {meta['shape']} in the {meta['position']}"
    assert samples[0]["txt"].decode() == meta["caption"] == caption
    assert resolve_shards(str(out / "{000000..000002}.tar"))[1] == [10, 10, 5]


def test_webdataset_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    ms.make_shards("shapes", tmp_path, maxcount=4, length=8, log=None)
    ds = wds.WebDataset(str(tmp_path / "{000000..000001}.tar"), shardshuffle=False).decode("rgb8")
    got = list(ds)
    ours = [s for name in ("000000.tar", "000001.tar") for s in iter_shard(tmp_path / name)]
    assert len(got) == len(ours) == 8 and got[0]["png"].shape == (32, 32, 3)
    for theirs, mine in zip(got, ours, strict=True):  # every sample's key, caption, metadata and pixels
        assert theirs["__key__"] == mine["__key__"]
        assert theirs["txt"] == mine["txt"].decode() and theirs["txt"].startswith("a ")
        assert theirs["json"] == json.loads(mine["json"])
        assert np.array_equal(theirs["png"], np.asarray(decode_image(mine["png"]).convert("RGB")))


@pytest.mark.parametrize("captions", ["txt", "json", "jsonl", "csv"])
def test_folder_captions(tmp_path, captions):
    src = _folder(tmp_path, captions=captions)
    out = tmp_path / "out"
    report = ms.make_shards(src, out, maxcount=4, log=None)
    assert report.written == 6 and not report.skipped
    got = {json.loads(s["json"])["source"]: s["txt"].decode() for p in _tars(out) for s in iter_shard(out / p)}
    assert got == {(f"sub/img{i}.png" if i % 2 else f"img{i}.png"): f"caption number {i}" for i in range(6)}


def test_a_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(f"caption {i}")
    (src / "img1.txt").write_bytes("un caf\xe9".encode("cp1252"))
    report = ms.make_shards(src, tmp_path / "out", maxcount=2, log=None)
    assert report.written == 2 and report.skipped == {"caption not UTF-8": 1}


def test_member_extensions_are_read_lower_cased_as_webdataset_reads_them(tmp_path):
    """A tar of camera files (IMG_1.JPG beside IMG_1.txt) holds samples with a ``jpg``, as webdataset reads it."""
    import io

    import webdataset as wds

    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(buf, "JPEG")
            for name, data in ((f"IMG_{i}.JPG", buf.getvalue()), (f"IMG_{i}.TXT", b"a photo")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ours = [sorted(k for k in raw if not k.startswith("__")) for raw in iter_shard(shard)]
    theirs = [sorted(k for k in raw if not k.startswith("__")) for raw in wds.WebDataset(str(shard),
                                                                                      shardshuffle=False)]
    assert ours == theirs == [["jpg", "txt"], ["jpg", "txt"]]
    assert sample_key("a/IMG_1.JPG") == ("a/IMG_1", "jpg")


def test_sixteen_bit_grey_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    """PIL converts a 16-bit grey image (mode I;16) to 8 bits by clipping at 255: a 0..65535 ramp would be nearly
    white. The transform scales it (v / 257), for training and for the latent cache alike."""
    from ldm.data.transforms import ImageTransform

    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        out = ImageTransform(size=32, mode="L").to_uint8(image)
    np.testing.assert_array_equal(out[0].numpy(), (ramp / 257).round().astype(np.uint8))
    rgb = ImageTransform(size=32, mode="RGB").to_uint8(Image.open(path))
    assert rgb.shape == (3, 32, 32) and abs(float(rgb.float().mean()) - 127.5) < 2


def test_folder_skips_corrupt_and_uncaptioned(tmp_path):
    src = _folder(tmp_path, n=5)
    (src / "img0.txt").unlink()  # missing caption
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt image
    (src / "broken.txt").write_text("never written")
    (src / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    (src / "trunc.txt").write_text("nope")
    out = tmp_path / "out"
    report = ms.make_shards(src, out, maxcount=3, size=16, fmt="jpg", log=None)
    assert report.written == 4
    assert report.skipped["missing caption"] == 1
    assert sum(n for reason, n in report.skipped.items() if reason.startswith("unreadable image")) == 2
    index = read_index(out)
    assert index["total"] == 4 and sum(index["skipped"].values()) == 3
    sample = next(iter_shard(out / index["shards"][0]["name"]))
    img = Image.open(__import__("io").BytesIO(sample["jpg"]))
    assert img.format == "JPEG" and min(img.size) == 16


def test_failure_mid_run_leaves_no_partial_shard_and_rerun_completes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write = ShardWriter.write

    def failing(self, key, fields):
        if self.path.name == "000001.tar" and self.count == 2:
            raise RuntimeError("boom")
        real_write(self, key, fields)

    monkeypatch.setattr(ShardWriter, "write", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ms.make_shards("shapes", out, maxcount=5, length=15, log=None)
    assert _tars(out) == ["000000.tar"] and not [p for p in out.iterdir() if ".tmp" in p.name]
    first = (out / "000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(ShardWriter, "write", real_write)
    report = ms.make_shards("shapes", out, maxcount=5, length=15, log=None)
    assert report.shards_reused == 1 and report.shards_written == 2 and report.written == 15
    assert (out / "000000.tar").stat().st_mtime_ns == first
    assert _tars(out) == ["000000.tar", "000001.tar", "000002.tar"]


KILLER = """
import os, signal, sys
from ldm.data import make_shards as ms
from ldm.data.shards import ShardWriter
real = ShardWriter.write
def write(self, key, fields):
    if self.path.name == "000001.tar" and self.count == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # die mid-shard, with a half-written temporary file
    real(self, key, fields)
ShardWriter.write = write
ms.make_shards("shapes", sys.argv[1], maxcount=5, length=12, log=None)
"""


def test_killed_process_leaves_no_truncated_tar(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert _tars(out) == ["000000.tar"]
    assert any(".tmp" in p.name for p in out.iterdir())  # the partial file exists, under a temporary name
    report = ms.make_shards("shapes", out, maxcount=5, length=12, log=None)
    assert report.written == 12 and report.shards_reused == 1
    assert not any(".tmp" in p.name for p in out.iterdir())
    for name in _tars(out):  # every tar is complete and readable
        with tarfile.open(out / name) as tar:
            tar.getmembers()
    assert read_index(out)["total"] == 12


def test_rerun_with_other_settings_refuses(tmp_path):
    ms.make_shards("shapes", tmp_path, maxcount=5, length=10, log=None)
    with pytest.raises(ValueError, match="different run"):
        ms.make_shards("shapes", tmp_path, maxcount=4, length=10, log=None)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_fast_tar_reader_matches_tarfile(tmp_path, fmt):
    import io

    from ldm.data.shards import _tar_members

    names = ["a/b.txt", ("x" * 150 if fmt != tarfile.USTAR_FORMAT else "p" * 120) + "/k.json", "é.txt"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for n in names:
            data = n.encode() * 3
            info = tarfile.TarInfo(n)
            info.size, info.mtime = len(data), 1.5  # a float mtime makes pax records
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(_dir_info())
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert list(_tar_members(path)) == expected and len(expected) == 3


def _dir_info() -> tarfile.TarInfo:
    info = tarfile.TarInfo("somedir")
    info.type = tarfile.DIRTYPE
    return info


def test_rerun_with_other_shapes_size_refuses(tmp_path):
    ms.make_shards("shapes", tmp_path, maxcount=5, length=10, size=16, log=None)
    with pytest.raises(ValueError, match="different run"):
        ms.make_shards("shapes", tmp_path, maxcount=5, length=10, size=24, log=None)


def test_an_out_that_is_a_file_is_a_config_error(tmp_path):
    afile = tmp_path / "in.png"
    afile.write_bytes(b"not a folder")
    with pytest.raises(ConfigError, match=r"OUT=.*in\.png: cannot make the shard folder there.*not a file"):
        ms.make_shards("shapes", afile, maxcount=4, length=8, size=16, log=None)
    assert afile.read_bytes() == b"not a folder"
