"""Shards read over HTTP (a server on 127.0.0.1 started here) and through pipe: commands, as from local files: every
sample exactly once per epoch, exact mid-epoch resume, counts from the remote index.json or counted once and cached,
clear errors naming the URL and the command's stderr, and img2dataset's output read as it is."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import shutil
import socket
import tarfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from ldm.data import make_shards as ms
from ldm.data import shards as shards_module
from ldm.data.datamodule import ShardDataModule
from ldm.data.shards import iter_shard, resolve_shards
from ldm.data.urls import FetchError, ShardError, serve_directory, shard_name, sibling
from ldm.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http:// URLs with curl")

SPEC = "{000000..000003}.tar"


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """4 shards x 8 samples of 8 px shapes, with index.json."""
    out = tmp_path / "shards"
    ms.make_shards("shapes", out, maxcount=8, length=32, size=8, log=None)
    return out


@pytest.fixture
def server(shards: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving the shard folder; stopped at the end of the test."""
    with serve_directory(shards) as url:
        yield url


@pytest.fixture(autouse=True)
def count_cache(tmp_path: Path, monkeypatch) -> Path:
    """Counted remote shards are cached under $LDM_CACHE: a fresh one per test; no index is cached across tests."""
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shards_module, "_INDEX_CACHE", {})
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch) -> None:
    """A shard that fails to fetch is read again at once here, not after seconds."""
    monkeypatch.setattr(shards_module, "FETCH_RETRY_DELAY_S", 0.0)


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, failing the first requests for a file as its rule says: ``(answer, times)``, the answer a
    status code (404, 503) or ``"cut"`` (the headers promise the whole file; half of it is sent)."""

    rules: dict[str, list] = {}
    hits: dict[str, int] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.hits[name] = self.hits.get(name, 0) + 1
        rule = self.rules.get(name)
        if rule is not None and rule[1] > 0:
            rule[1] -= 1
            if rule[0] != "cut":
                self.send_error(rule[0])
                return
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def _flaky(directory: Path, **rules: tuple) -> Iterator[tuple[str, dict[str, int]]]:
    """A server on 127.0.0.1 over ``directory`` with failure rules by file name (``000001_tar=("cut", 1)``); yields
    its URL and the requests per file; stopped when the block ends."""
    handler = type("Rules", (_Flaky,), {"rules": {k.replace("_", "."): list(v) for k, v in rules.items()}, "hits": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_a_shard_cut_off_mid_transfer_is_read_again_and_the_epoch_is_whole(shards):
    kw = dict(batch_size=8, image_size=8, shuffle_buffer=4, seed=1)
    local = _keys(ShardDataModule(str(shards), **kw))
    with _flaky(shards, **{"000001_tar": ("cut", 1)}) as (url, hits):
        with pytest.warns(UserWarning, match=rf"reading {url}/000001.tar failed.*reading it again"):
            remote = _keys(ShardDataModule(f"{url}/{SPEC}", **kw))
        assert hits["000001.tar"] == 2
    assert remote == local  # every sample, in the same order: nothing taken for lost


def test_a_shard_that_cannot_be_fetched_stops_the_epoch_naming_the_url(shards):
    """index.json lists the shard, but the server answers 404: an error, not a short epoch of the other shards."""
    with _flaky(shards, **{"000002_tar": (404, 99)}) as (url, hits):
        dm = ShardDataModule(f"{url}/{SPEC}", batch_size=8, image_size=8, shuffle_buffer=4, seed=1)
        with pytest.raises(FetchError, match=rf"reading {url}/000002.tar failed: .*status 22.*404"):
            _keys(dm)
        assert hits["000002.tar"] == shards_module.FETCH_ATTEMPTS


def test_a_count_that_fails_to_fetch_is_read_again_and_a_failed_one_never_cached(shards, count_cache):
    (shards / "index.json").unlink()
    with _flaky(shards, **{"000000_tar": ("cut", 1), "000002_tar": (404, shards_module.FETCH_ATTEMPTS)}) as (url, _):
        with pytest.raises(FetchError, match=rf"{url}/000002.tar failed"):
            resolve_shards(f"{url}/{SPEC}")
        assert len(list((count_cache / "shard_counts").glob("*.json"))) == 2  # 000000 (read twice) and 000001
        assert resolve_shards(f"{url}/{SPEC}")[1] == [8, 8, 8, 8]  # the server answers now: counted, not cached


def test_http_errors_a_server_calls_transient_are_asked_again_by_curl(shards, monkeypatch):
    monkeypatch.setattr(shards_module, "FETCH_ATTEMPTS", 1)  # no read again: curl's own retry
    with _flaky(shards, **{"000001_tar": (503, 1)}) as (url, hits):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(list(iter_shard(f"{url}/000001.tar", 8))) == 8
        assert hits["000001.tar"] == 2


def _keys(dm: ShardDataModule) -> list[list[str]]:
    dm.setup("fit")
    return [list(b["key"]) for b in dm.train_dataloader()]


def _all_keys(shards: Path) -> set[str]:
    return {s["__key__"] for p in sorted(shards.glob("*.tar")) for s in iter_shard(p)}


def test_url_helpers():
    assert shard_name("http://h/d/000001.tar") == "000001.tar"
    assert sibling("http://h/d/000001.tar", "index.json") == "http://h/d/index.json"
    assert sibling("pipe:aws s3 cp s3://b/d/train-000001.tar -", "index.json") == \
        "pipe:aws s3 cp s3://b/d/index.json -"
    assert sibling("/x/y/000002.tar", "000002_stats.json") == "/x/y/000002_stats.json"
    assert sibling("file:///x/y/000002.tar", "index.json") == "/x/y/index.json"


@pytest.mark.parametrize("scheme", ["http", "pipe"])
def test_an_epoch_over_http_or_a_pipe_delivers_every_sample_once(shards, server, scheme):
    spec = f"{server}/{SPEC}" if scheme == "http" else f"pipe:cat {shards}/{SPEC}"
    paths, counts = resolve_shards(spec)
    assert counts == [8, 8, 8, 8] and paths[0].startswith("http" if scheme == "http" else "pipe:cat ")
    batches = _keys(ShardDataModule(spec, batch_size=8, image_size=8, shuffle_buffer=4, seed=1))
    keys = [k for b in batches for k in b]
    assert len(keys) == 32 and set(keys) == _all_keys(shards)
    # the same order as from the local folder: the read plan does not depend on where the bytes come from
    local = _keys(ShardDataModule(str(shards), batch_size=8, image_size=8, shuffle_buffer=4, seed=1))
    assert batches == local


def test_mid_epoch_resume_over_http_is_exact(server):
    spec = f"{server}/{SPEC}"
    kw = dict(batch_size=4, image_size=8, shuffle_buffer=4, seed=2)
    whole = _keys(ShardDataModule(spec, **kw))
    first = ShardDataModule(spec, **kw)
    first.setup("fit")
    loader = first.train_dataloader()
    it = iter(loader)
    head = [list(next(it)["key"]) for _ in range(3)]
    state = loader.state_dict()
    resumed = ShardDataModule(spec, **kw)
    resumed.load_state_dict(state)
    assert head + _keys(resumed) == whole


def test_counts_come_from_the_remote_index_or_are_counted_once_and_cached(shards, server, count_cache, monkeypatch):
    spec = f"{server}/{SPEC}"
    assert resolve_shards(spec)[1] == [8] * 4 and not count_cache.exists()  # from http://.../index.json
    (shards / "index.json").unlink()
    monkeypatch.setattr(shards_module, "_INDEX_CACHE", {})
    assert resolve_shards(spec)[1] == [8] * 4  # read once over HTTP ...
    assert len(list((count_cache / "shard_counts").glob("*.json"))) == 4

    def no_reading(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr(shards_module, "count_samples", no_reading)
    monkeypatch.setattr(shards_module, "_INDEX_CACHE", {})
    assert resolve_shards(spec)[1] == [8] * 4  # ... then from the local cache


def test_a_shard_that_delivers_fewer_samples_than_its_count_is_an_error(shards, server):
    index = json.loads((shards / "index.json").read_text())
    index["shards"][1]["count"] = 9
    (shards / "index.json").write_text(json.dumps(index))
    url = f"{server}/000001.tar"
    with pytest.raises(ShardError, match=rf"{url} delivered 8 samples, fewer than the 9"):
        list(iter_shard(url, 9))


def test_unreachable_urls_and_failing_commands_name_the_url_and_stderr(shards, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/000000.tar"
    with pytest.raises(ShardError, match=rf"reading {url} failed: .*status 7.*stderr: .*(connect|Connection)"):
        list(iter_shard(url))
    missing = f"pipe:cat {tmp_path}/nope/000000.tar"
    with pytest.raises(ShardError, match=r"reading pipe:cat .*nope/000000.tar failed: .*status 1.*No such file"):
        resolve_shards(missing)


def test_a_404_names_the_url(server):
    with pytest.raises(ShardError, match=rf"reading {server}/missing.tar failed: .*status 22.*404"):
        list(iter_shard(f"{server}/missing.tar"))


def test_a_corrupt_remote_sample_is_skipped_and_counted(shards, server):
    path = shards / "000001.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[4].offset  # the second sample's second member
    data = bytearray(path.read_bytes())
    data[offset + 124 : offset + 136] = b"zzzzzzzzzzz\0"
    path.write_bytes(bytes(data))
    url = f"{server}/000001.tar"
    with pytest.warns(UserWarning, match=rf"{url} is corrupt.*byte {offset}.*skipping its last 1 of 8"):
        got = list(iter_shard(url, 8))
    assert len(got) == 8 and sum("__error__" in s for s in got) == 1


def _img2dataset_folder(root: Path, shards: int = 2, per_shard: int = 5) -> Path:
    """A folder as img2dataset writes it (output_format=webdataset): NNNNN.tar with {key}.jpg/.txt/.json members,
    NNNNN_stats.json and NNNNN.parquet beside each."""
    root.mkdir()
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (12, 10), (20 * i, 100, 200)).save(buf, "JPEG")
                members = {"jpg": buf.getvalue(), "txt": f"a photo number {i}".encode(),
                           "json": json.dumps({"url": f"http://example/{key}.jpg", "key": key, "status": "success",
                                               "width": 12, "height": 10}).encode()}
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard + 1, "successes": per_shard,
                                                               "failed_to_download": 1}))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1")
    return root


def test_img2dataset_output_is_read_as_it_is(tmp_path, monkeypatch):
    folder = _img2dataset_folder(tmp_path / "img2dataset")

    def no_reading(*args, **kwargs):
        raise AssertionError("the _stats.json files give the counts")

    monkeypatch.setattr(shards_module, "count_samples", no_reading)
    paths, counts = resolve_shards(str(folder))
    assert [Path(p).name for p in paths] == ["00000.tar", "00001.tar"] and counts == [5, 5]
    dm = ShardDataModule(str(folder), batch_size=5, image_size=8, shuffle_buffer=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == sorted(f"{s:05d}{i:04d}" for s in range(2)
                                                                  for i in range(5))
    assert batches[0]["image"].shape[1:] == (3, 8, 8) and batches[0]["caption"][0].startswith("a photo number")


def test_too_few_remote_shards_for_ranks_and_workers_fail_before_reading(server):
    dm = ShardDataModule(f"{server}/{{000000..000001}}.tar", batch_size=4, image_size=8, num_workers=3)
    with warnings.catch_warnings(), pytest.raises((ConfigError, ValueError), match="2 shard.*3 worker"):
        warnings.simplefilter("ignore")
        dm.setup("fit")


def test_fsspec_urls_read_like_local_ones_and_unknown_stores_say_what_to_install(shards):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for p in sorted(shards.glob("*")):
        if p.is_file():
            memory.pipe(f"/bucket/{p.name}", p.read_bytes())
    try:
        spec = "memory://bucket/{000000..000003}.tar"
        assert resolve_shards(spec)[1] == [8] * 4  # the index.json beside them, through fsspec
        keys = [k for b in _keys(ShardDataModule(spec, batch_size=8, image_size=8, shuffle_buffer=0)) for k in b]
        assert sorted(keys) == sorted(_all_keys(shards))
        with pytest.raises(ShardError, match="memory://bucket/nope.tar does not exist"):
            list(iter_shard("memory://bucket/nope.tar"))
    finally:
        memory.rm("/bucket", recursive=True)
    with pytest.raises(ConfigError, match=r"no opener for nosuchstore://.*pipe: command"):
        list(iter_shard("nosuchstore://b/000000.tar"))
    from ldm.data.urls import fsspec_backend

    if not fsspec_backend("s3"):  # without s3fs: what to install, or the pipe: form
        with pytest.raises(ConfigError, match=r"s3://b/000000.tar: .*ldm\[remote\].*pipe:aws s3 cp"):
            list(iter_shard("s3://b/000000.tar"))
