"""Damaged shards and wrong input: corrupt or truncated tars are skipped and counted (a batch left empty trains on a
sample of the one before; one with nothing before it is named with the byte offset), an empty shard set says so,
make_shards/cache_latents refuse zero or negative counts with exit status 2, make_shards fails when every item was
skipped, and a full disk leaves no partial metadata."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from ldm.data import cache_latents as cl
from ldm.data import make_shards as ms
from ldm.data.datamodule import ShardDataModule
from ldm.data.shards import ShardWriter, iter_shard, read_index, resolve_shards
from ldm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """4 shards x 8 samples of 8 px shapes."""
    out = tmp_path / "shards"
    ms.make_shards("shapes", out, maxcount=8, length=32, size=8, log=None)
    return out


def _offsets(path: Path) -> list[tuple[str, int, int]]:
    """(member name, header offset, data size) of every member, from tarfile."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.size) for m in tar.getmembers()]


def _corrupt_size_field(path: Path, member: int) -> int:
    """Overwrite the size field of member ``member``'s header with non-octal bytes; returns the header offset."""
    offset = _offsets(path)[member][1]
    data = bytearray(path.read_bytes())
    data[offset + 124 : offset + 136] = b"zzzzzzzzzzz\0"
    path.write_bytes(bytes(data))
    return offset


def _truncate_mid_member(path: Path, member: int) -> int:
    """Cut the file in the middle of member ``member``'s data; returns the header offset."""
    _, offset, size = _offsets(path)[member]
    with open(path, "r+b") as f:
        f.truncate(offset + 512 + size // 2)
    return offset


def _keys(samples: list[dict]) -> list[str]:
    return [s["__key__"] for s in samples if "__error__" not in s]


@pytest.mark.parametrize(("member", "lost"), [(4, [1]), (3, [0, 1])])
def test_corrupt_header_is_skipped_and_counted(shards, member, lost):
    path = shards / "000001.tar"
    clean = _keys(list(iter_shard(path)))
    offset = _corrupt_size_field(path, member)  # 3 members a sample: 4 is the 2nd's png, 3 its json (its first)
    with pytest.raises(ConfigError, match=rf"{path}.*byte {offset}"):  # no count to pad to: named, not int()'d
        list(iter_shard(path))
    with pytest.warns(UserWarning, match=rf"{path}.*byte {offset}.*skipping its last {len(lost)} of 8"):
        got = list(iter_shard(path, 8))
    assert len(got) == 8  # the index count: positions after the damage stay where the read plan has them
    placeholders = [s for s in got if "__error__" in s]
    assert len(placeholders) == len(lost) and all(str(path) in s["__error__"] for s in placeholders)
    # a sample with a lost member is dropped whole; when the lost member starts a sample, the one before it (which
    # the reader cannot tell complete) goes too
    assert _keys(got) == [k for i, k in enumerate(clean) if i not in lost]
    assert all({"png", "txt", "json"} <= set(s) for s in got if "__error__" not in s)
    (shards / "index.json").unlink()
    with pytest.warns(UserWarning, match=rf"{path}.*byte {offset}.*counting the 8 readable samples"):
        assert resolve_shards([str(path)])[1] == [8]  # no index: keys with a readable member, the rest padded


def test_truncated_shard_is_skipped_and_counted(shards):
    path = shards / "000002.tar"
    clean = _keys(list(iter_shard(path)))
    offset = _truncate_mid_member(path, 6)  # the png of the third sample
    with pytest.raises(ConfigError, match=rf"{path} is truncated.*byte {offset}"):
        list(iter_shard(path))
    with pytest.warns(UserWarning, match=rf"{path} is truncated.*skipping its last 6 of 8"):
        got = list(iter_shard(path, 8))
    assert _keys(got) == clean[:2] and len(got) == 8


def test_truncated_at_member_boundary_is_not_silent(shards):
    path = shards / "000000.tar"
    offset = _offsets(path)[6][1]  # the third sample's first header: a cut exactly between samples
    with open(path, "r+b") as f:
        f.truncate(offset)
    with pytest.raises(ConfigError, match=rf"{path} is truncated.*byte {offset}"):
        list(iter_shard(path))


def _epoch(dm: ShardDataModule) -> list[dict]:
    dm.setup("fit")
    return list(dm.train_dataloader())


def test_loader_skips_a_truncated_shard_and_keeps_the_epoch_and_resume_exact(shards):
    _truncate_mid_member(shards / "000001.tar", 6)  # 2 of its 8 samples survive
    kw = dict(batch_size=8, image_size=8, shuffle_buffer=0, seed=3)
    with pytest.warns(UserWarning, match=r"000001.tar is truncated.*skipping its last 6 of 8"):
        batches = _epoch(ShardDataModule(str(shards), **kw))
    assert len(batches) == 4  # the length index.json gives: no "generator raised StopIteration"
    assert sorted(len(b["key"]) for b in batches) == [2, 8, 8, 8]
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 26 and not any("#missing" in k for k in keys)

    first = ShardDataModule(str(shards), **kw)
    first.setup("fit")
    loader = first.train_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = iter(loader)
        head = [next(it) for _ in range(2)]
        state = loader.state_dict()
        resumed = ShardDataModule(str(shards), **kw)
        resumed.load_state_dict(state)
        tail = _epoch(resumed)
    assert [b["key"] for b in head + tail] == [b["key"] for b in batches]


def test_a_batch_lost_entirely_names_the_shard_and_offset(shards):
    """The second batch, all of one shard, lost: a sample of the first stands in, with warnings naming the shard and
    the offset. The first batch lost has nothing before it: an error that names them."""
    offset = _truncate_mid_member(shards / "000001.tar", 0)  # nothing of the shard survives
    dm = ShardDataModule(str(shards), batch_size=8, image_size=8, shuffle_buffer=0, shuffle_shards=False)
    with pytest.warns(UserWarning, match=rf"000001.tar is truncated.*byte {offset}.*training on one sample of the "
                                         "batch before it"):
        assert [len(b["key"]) for b in _epoch(dm)] == [8, 1, 8, 8]
    offset = _truncate_mid_member(shards / "000000.tar", 0)
    dm = ShardDataModule(str(shards), batch_size=8, image_size=8, shuffle_buffer=0, shuffle_shards=False)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=rf"no earlier batch of this worker can stand "
                                                                      rf"in.*000000.tar is truncated.*byte {offset}"):
        _epoch(dm)


def test_zero_samples_has_its_own_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(2):
        ShardWriter(empty / f"{i:06d}.tar").commit()  # valid tars without samples
    for spec in (str(empty), str(empty / "{000000..000001}.tar")):
        with pytest.raises(ConfigError, match="holds no samples") as info:
            ShardDataModule(spec, batch_size=2).setup("fit")
        assert spec in str(info.value) and "python -m ldm.data.make_shards" in str(info.value)
        assert "smaller shards" not in str(info.value)
    (empty / "index.json").write_text(json.dumps({"shards": [], "total": 0}))
    with pytest.raises(ConfigError, match=rf"{empty}.*holds no samples.*python -m ldm.data.make_shards"):
        ShardDataModule(str(empty), batch_size=2).setup("fit")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--length", "0"), ("--length", "-3"), ("--maxcount", "0"), ("--maxcount", "-1"), ("--size", "0"),
     ("--size", "-8")],
)
def test_make_shards_refuses_zero_and_negative(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    args = ["shapes", str(out), "--length", "4", "--size", "8", flag, value]
    assert ms.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and "Traceback" not in err
    assert not out.exists() or not list(out.glob("*.tar"))


def test_make_shards_cli_exit_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ldm.data.make_shards", "shapes", str(tmp_path / "o"), "--length", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --length") and "Traceback" not in proc.stderr


def test_make_shards_fails_when_every_item_is_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        (src / f"bad{i}.txt").write_text("a caption")
    Image.new("RGB", (8, 8)).save(src / "nocaption.png")
    out = tmp_path / "out"
    assert ms.main([str(src), str(out), "--maxcount", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no samples written") and "unreadable image (UnidentifiedImageError): 3" in err
    assert "missing caption: 1" in err
    assert not (out / "index.json").exists() and not list(out.glob("*.tar"))
    (src / "nocaption.txt").write_text("now captioned")  # fixed: a rerun into the same OUT works
    assert ms.main([str(src), str(out), "--maxcount", "2"]) == 0
    assert read_index(out)["total"] == 1


def _fail_fsync_for(monkeypatch: pytest.MonkeyPatch, needle: str) -> None:
    """A full disk for files whose name contains ``needle``: half the bytes land, then fsync fails with ENOSPC."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name an open file")
    real = os.fsync

    def fsync(fd: int) -> None:
        if needle in os.readlink(f"/proc/self/fd/{fd}"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if p.is_file() and (".tmp" in p.name or p.stat().st_size == 0)]


@pytest.mark.parametrize("needle", ["index.json", "000001.tar", "run.json"])
def test_full_disk_leaves_no_partial_files(tmp_path, monkeypatch, needle):
    out = tmp_path / "out"
    _fail_fsync_for(monkeypatch, needle)
    with pytest.raises(OSError, match="No space left"):
        ms.make_shards("shapes", out, maxcount=4, length=12, size=8, log=None)
    assert not (out / "index.json").exists() and not list(out.rglob(needle))
    assert _leftovers(out) == []
    monkeypatch.undo()
    report = ms.make_shards("shapes", out, maxcount=4, length=12, size=8, log=None)
    assert report.written == 12 and read_index(out)["total"] == 12 and _leftovers(out) == []


class _TinyVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 4, stride=4)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        mean = self.conv(x)
        return SimpleNamespace(mean=mean, std=torch.ones_like(mean))


@pytest.mark.parametrize(("flag", "value"), [("--size", "0"), ("--batch-size", "0"), ("--batch-size", "-2")])
def test_cache_latents_refuses_zero_and_negative(shards, tmp_path, capsys, flag, value):
    vae = str(tmp_path / "vae.ckpt")  # refused before any model is loaded
    assert cl.main([str(shards), str(tmp_path / "lat"), "--vae", vae, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} must be a positive integer") and "Traceback" not in err
    kwargs = {"image_size": int(value)} if flag == "--size" else {"batch_size": int(value)}
    with pytest.raises(ConfigError, match=flag):
        cl.cache_latents(shards, tmp_path / "lat", _TinyVAE(), log=None, **kwargs)
    assert not (tmp_path / "lat").exists()


def test_cache_latents_missing_checkpoint_is_a_clean_error(shards, tmp_path, capsys):
    assert cl.main([str(shards), str(tmp_path / "lat"), "--vae", str(tmp_path / "nope.ckpt"), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "nope.ckpt does not exist" in err


def test_cache_latents_skips_and_counts_a_damaged_shard(shards, tmp_path):
    _truncate_mid_member(shards / "000003.tar", 6)  # 2 of 8 samples survive
    vae = _TinyVAE()
    with pytest.warns(UserWarning, match="000003.tar is truncated"):
        index = cl.cache_latents(shards, tmp_path / "lat", vae, image_size=8, batch_size=4, log=None)
    assert [s["count"] for s in index["shards"]] == [8, 8, 8, 2] and index["skipped"] == {"damaged shard": 6}
    assert len(list(iter_shard(tmp_path / "lat" / "000003.tar"))) == 2
    again = cl.cache_latents(shards, tmp_path / "lat", vae, image_size=8, batch_size=4, log=None)
    assert [s["count"] for s in again["shards"]] == [8, 8, 8, 2]  # the cached count, not the input's index count


@pytest.mark.parametrize("buckets", [None, {"pixels": 1024, "step": 8, "max_ratio": 4.0}])
def test_a_batch_of_which_nothing_decodes_trains_on_a_sample_of_the_batch_before_and_resumes_alike(tmp_path, buckets):
    """A damaged image alone in its batch (the last partial batch; with buckets, the only image of its aspect ratio):
    the batch becomes one sample of the worker's batch before it, with a warning, and a run resumed at that batch
    gets the same sample, where it used to fail there again."""
    import io

    from ldm.data.shards import write_index

    def png(w: int, h: int, i: int) -> bytes:
        buf = io.BytesIO()
        Image.effect_noise((w, h), 40 + i).convert("RGB").save(buf, "PNG")
        return buf.getvalue()

    out = tmp_path / "shards"
    out.mkdir()
    with ShardWriter(out / "000000.tar") as writer:
        for i in range(8):
            writer.write(f"{i:04d}", {"png": png(32, 32, i), "txt": b"a square"})
        writer.write("0008", {"png": png(64, 16, 9)[:200], "txt": b"a wide one, cut"})  # its header reads, no pixels
    write_index(out, [{"name": "000000.tar", "count": 9}])

    def loader(state=None):
        dm = ShardDataModule(str(out), batch_size=4, image_size=32, shuffle_buffer=0, shuffle_shards=False, seed=0,
                             buckets=buckets)
        if state is not None:
            dm.load_state_dict(state)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    with pytest.warns(UserWarning, match=r"every sample of a batch \(shard 000000.tar, first key 0008.*training on "
                                         "one sample of the batch before it instead, key 0004"):
        batches = list(first)
    assert [list(b["key"]) for b in batches] == [["0000", "0001", "0002", "0003"], ["0004", "0005", "0006", "0007"],
                                                  ["0004"]]
    assert batches[2]["image"].shape[-2:] == ((16, 64) if buckets else (32, 32))  # the lost batch's own size
    with pytest.warns(UserWarning, match="training on one sample of the batch before it"):
        resumed = list(loader(first._state(0, 2)))
    assert len(resumed) == 1
    torch.testing.assert_close(resumed[0]["image"], batches[2]["image"], rtol=0, atol=0)
