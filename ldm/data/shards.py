"""Webdataset-compatible tar shards: naming, atomic writing, reading, and the deterministic read plan.

A shard is a plain tar whose members are ``{key}.{ext}`` (``000123.png``, ``000123.txt``, ``000123.json``); members
sharing a key form one sample, as in webdataset. A shard directory holds ``000000.tar``, ``000001.tar``, ... and an
``index.json`` listing each shard with its sample count, which the reader uses to split work and to equalise batch
counts across DDP ranks.

The read plan makes the sample order a pure function of ``(seed, epoch, rank, worker)``: shards are assigned once to
(rank, worker) slots by a seeded permutation, each worker shuffles its shards and samples per epoch with an RNG
seeded from that tuple, and the DataLoader's round robin over workers fixes the batch order. Resuming is then
"replay the same stream and skip to the position", with no hidden state to save beyond ``(epoch, batches consumed)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.checkpoint import atomic_write_bytes, fsync_dir
from ldm.data.urls import FetchError, ShardError, is_local, local_path, open_url, read_small, shard_name, sibling
from ldm.errors import ConfigError
from ldm.local_cache import cache_dir

INDEX_NAME = "index.json"
MAKE_SHARDS_HOW = "python -m ldm.data.make_shards SRC OUT (SRC: an image folder, shapes or mnist)"
# the records that make_shards and cache_latents write before their first shard; index.json comes last, so a folder
# with a record and no index.json is a run that was killed or failed midway (its shards are only a part)
RUN_RECORDS = {"_stats/run.json": "make_shards", "cache_settings.json": "cache_latents"}


def expand_braces(spec: str) -> list[str]:
    """Expand a shard spec as webdataset does (``webdataset.shardlists.expand_urls``): ``{000000..000009}`` ranges
    (zero padding kept), ``{a,b,c}`` lists, and ``::`` between specs."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(spec))


def sample_key(member_name: str) -> tuple[str, str]:
    """Split a tar member name into (key, extension) at the first dot of its base name, the extension lower-cased
    (webdataset's conventions: ``IMG_1.JPG`` is the sample ``IMG_1``'s ``jpg``)."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return member_name, ""
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """Load a shard directory's ``index.json`` ({shards: [{name, count}], total, ...})."""
    with open(Path(directory) / INDEX_NAME) as f:
        return json.load(f)


def write_index(directory: str | os.PathLike, shards: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write ``index.json`` atomically; ``shards`` is a list of {name, count, ...} in shard order."""
    index = {"shards": shards, "total": int(sum(s["count"] for s in shards)), **extra}
    atomic_write_bytes(Path(directory) / INDEX_NAME, json.dumps(index, indent=1).encode())
    return index


FETCH_ATTEMPTS = 3  # reads of a remote shard that failed to fetch (curl retries HTTP errors itself, not cuts)
FETCH_RETRY_DELAY_S = 2.0  # doubled after each failed attempt


def _retrying(url: str, attempt: int, err: FetchError, already: int) -> None:
    """Raise ``err`` after the last attempt, or for a local file; else warn and wait before the next one."""
    if attempt + 1 >= FETCH_ATTEMPTS or is_local(url):
        raise err
    delay = FETCH_RETRY_DELAY_S * 2**attempt
    warnings.warn(f"{err}; reading it again in {delay:g} s (attempt {attempt + 2} of {FETCH_ATTEMPTS}"
                  + (f", past the {already} samples already read)" if already else ")"), stacklevel=3)
    time.sleep(delay)


def count_samples(path: str | os.PathLike) -> int:
    """Number of distinct keys in a shard (reads the tar headers only). Damage is warned about and the readable
    keys are counted (the reader skips what is lost); a missing file or one that is no tar raises ShardError. A
    shard that fails to fetch is read again (``FETCH_ATTEMPTS``), then raises: never a partial count."""
    for attempt in range(FETCH_ATTEMPTS):
        try:
            return _count_samples(path)
        except FetchError as err:
            _retrying(str(path), attempt, err, 0)
    raise AssertionError("unreachable")


def _count_samples(path: str | os.PathLike) -> int:
    keys: set[str] = set()
    damaged: list[str] = []
    try:
        keys.update(sample_key(name)[0] for name, _ in _tar_members(path, headers_only=True, damaged=damaged))
    except ShardError as err:
        if not keys or isinstance(err, FetchError):
            raise
        damaged.append(str(err))
    if damaged:
        warnings.warn(f"{'; '.join(damaged)}: counting the {len(keys)} readable samples", stacklevel=2)
    return len(keys)


def resolve_shards(spec: str | os.PathLike | Iterable[str]) -> tuple[list[str], list[int]]:
    """Shard URLs and sample counts from a local directory (its index.json, or img2dataset's ``*_stats.json``), a
    brace pattern of paths or URLs (``http://``, ``pipe:``, ``s3://``, ...), or a list of them.

    A shard's count comes from the ``index.json`` beside it (fetched the way the shard is opened: ``sibling``), else
    from img2dataset's ``{shard}_stats.json`` beside it, else from reading the shard's tar headers once; remote counts
    read that way are cached locally (``LDM_CACHE``, default ``~/.cache/ldm``). A spec that names no shards, or
    shards holding no samples, is a ConfigError that says how to make some.
    """
    if isinstance(spec, str | os.PathLike) and is_local(str(spec)) and local_path(spec).is_dir():
        directory = local_path(spec)
        if (directory / INDEX_NAME).exists():
            try:
                index = read_index(directory)
                paths = [str(directory / s["name"]) for s in index["shards"]]
                counts = [int(s["count"]) for s in index["shards"]]
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{directory / INDEX_NAME} is not a valid shard index ({type(err).__name__}: "
                                  f"{err}); rewrite the shards with {MAKE_SHARDS_HOW}") from None
            missing = [p for p in paths if not Path(p).exists()]
            if missing:
                raise ConfigError(f"{len(missing)} shard(s) listed in {directory / INDEX_NAME} do not exist "
                                  f"(first: {missing[0]}); rerun make_shards into {directory} to write them again")
            _check_not_empty(spec, counts)
            return paths, counts
        _check_finished(directory)
        paths = sorted(str(p) for p in directory.glob("*.tar"))
    elif isinstance(spec, str | os.PathLike):
        paths = expand_braces(str(spec))
    else:
        paths = [p for s in spec for p in expand_braces(str(s))]
    if not paths:
        raise ConfigError(f"no shards found for {spec!r}: give a shard folder (with index.json), a brace pattern "
                          f"such as data/{{000000..000009}}.tar or http://host/{{000000..000009}}.tar, or a list of "
                          f"shard paths or URLs; make shards with {MAKE_SHARDS_HOW}")
    counts = [shard_count(p) for p in paths]
    _check_not_empty(spec, counts)
    return paths, counts


def _check_finished(directory: Path) -> None:
    """ConfigError when ``directory`` (without an index.json) holds the run record of make_shards or cache_latents:
    their run stopped before writing all its shards, and reading the ones present would train on a part silently."""
    for record, command in RUN_RECORDS.items():
        if (directory / record).is_file():
            raise ConfigError(f"{directory} holds an unfinished {command} run ({record} but no {INDEX_NAME}: it was "
                              f"interrupted or failed before writing all its shards): rerun the {command} command to "
                              "finish it (it writes only the missing shards), or delete the folder")


def shard_count(url: str) -> int:
    """The sample count of one shard: from the ``index.json`` beside it, img2dataset's ``{shard}_stats.json``
    (``successes``), or by reading its tar headers (remote: once, then from the local cache)."""
    name = shard_name(url)
    known = _index_counts(sibling(url, INDEX_NAME))
    if name in known:
        return known[name]
    stats = read_small(sibling(url, name[: -len(".tar")] + "_stats.json")) if name.endswith(".tar") else None
    if stats is not None:
        try:
            return int(json.loads(stats)["successes"])
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{sibling(url, name)}: its _stats.json has no 'successes' count; counting the samples",
                          stacklevel=3)
    if is_local(url):
        return count_samples(url)
    return cached("shard_counts", url, lambda: count_samples(url))


def cached(kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per ``key``, then its JSON value from ``cache_dir(kind)``; written whole, and ranks that
    compute the same value at once may both write it."""
    path = cache_dir(kind) / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record["key"] == key:
                return record["value"]
        except (ValueError, KeyError, TypeError):
            pass
    value = compute()
    atomic_write_bytes(path, json.dumps({"key": key, "value": value}).encode(), many=True)
    return value


def _check_not_empty(spec: Any, counts: list[int]) -> None:
    if sum(counts) == 0:
        raise ConfigError(f"the shard set {spec!r} holds no samples ({len(counts)} shard(s), 0 samples): nothing to "
                          f"read. Make shards with samples: {MAKE_SHARDS_HOW} (its report says why items were "
                          "skipped)")


_INDEX_CACHE: dict[str, dict[str, int]] = {}


def _index_counts(index_url: str) -> dict[str, int]:
    """{shard name: count} of the index.json at ``index_url`` (local or remote), {} when there is none; read once
    per process."""
    if index_url not in _INDEX_CACHE:
        try:
            raw = read_small(index_url)
            _INDEX_CACHE[index_url] = {} if raw is None else \
                {s["name"]: int(s["count"]) for s in json.loads(raw)["shards"]}
        except (ValueError, KeyError, TypeError):
            _INDEX_CACHE[index_url] = {}
    return _INDEX_CACHE[index_url]


_FILE_KINDS = (b"0", b"\0", b"7")  # tar type flags of regular files


class _ForwardReader:
    """Forward-only reading of a shard stream with push-back, so one tar reader serves local files (skips are seeks)
    and remote streams (skips are reads)."""

    def __init__(self, f: Any) -> None:
        self.f, self.pending = f, b""
        try:  # a local file: its size bounds the seeks
            self.end = os.fstat(f.fileno()).st_size if f.seekable() else None
        except (AttributeError, OSError, ValueError):
            self.end = None

    def read(self, n: int) -> bytes:
        out = self.pending[:n]
        self.pending = self.pending[n:]
        while len(out) < n:
            chunk = self.f.read(n - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes; returns how many were there to skip."""
        if n <= len(self.pending) or self.end is None:
            done = 0
            while done < n:
                got = len(self.read(min(n - done, 1 << 20)))
                if not got:
                    break
                done += got
            return done
        done = len(self.pending)
        self.pending = b""
        here = self.f.tell()
        target = min(self.end, here + n - done)
        self.f.seek(target)
        return done + target - here

    def unread(self, data: bytes) -> None:
        self.pending = data + self.pending


def _tar_members(
    path: str | os.PathLike, headers_only: bool = False, damaged: list[str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an uncompressed tar, in order, from a local path or any shard URL
    (``ldm.data.urls.open_url``); compressed tars go to ``tarfile``. ``headers_only`` yields empty data (for
    counting).

    Our own reader (ustar, GNU long names, pax path records), not webdataset's tar iteration: that one uses tarfile's
    stream mode, which ends a shard silently at a header failing its checksum or at a cut between members, and
    gives no byte offset. Here damage raises ShardError naming the shard and the byte offset, after yielding the
    members before it: a member cut short, a partial header, a missing end-of-archive marker (truncation), or a
    header that fails its checksum. Given a ``damaged`` list, a corrupt header is instead skipped: its message is
    appended to the list and reading resumes at the next valid header (the members in between are lost).
    """
    with open_url(path) as stream:
        f = _ForwardReader(stream)
        head = f.read(2)
        f.unread(head)
        if head in (b"\x1f\x8b", b"BZ", b"\xfd7"):  # gzip / bzip2 / xz
            yield from _compressed_members(path, f, headers_only)
            return
        long_name: str | None = None
        offset = 0
        while True:
            header = f.read(512)
            if header == bytes(512):
                return
            if len(header) < 512:
                what = f"a partial tar header ({len(header)} of 512 bytes)" if header else "the end of the file"
                raise ShardError(f"shard {path} is truncated: {what} at byte {offset}, where a tar header or the "
                                 "end-of-archive marker should be")
            try:
                size, kind = _parse_header(path, header, offset)
            except ShardError as err:
                resume = _next_header(f, offset + 512) if damaged is not None else None
                if resume is None:
                    raise
                assert damaged is not None
                damaged.append(f"{err}; skipped to the next valid header at byte {resume}")
                offset, long_name = resume, None
                continue
            if headers_only and kind not in (b"L", b"x", b"g"):
                data = b""
                got = f.skip(size)
            else:
                data = f.read(size)
                got = len(data)
            if got < size:
                cut = long_name or header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                raise ShardError(f"shard {path} is truncated: the member whose header is at byte {offset} declares "
                                 f"{size} bytes, {got} are present", member=cut if kind in _FILE_KINDS else None)
            f.skip((-size) % 512)
            member_offset, offset = offset, offset + 512 + size + (-size) % 512
            try:
                if kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8")
                    continue
                if kind in (b"x", b"g"):
                    if kind == b"x":
                        for record in data.decode("utf-8").split("\n"):
                            _, _, kv = record.partition(" ")
                            key, _, value = kv.partition("=")
                            if key == "path":
                                long_name = value
                    continue
                if kind not in _FILE_KINDS:
                    long_name = None
                    continue
                name = long_name
                if name is None:
                    name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
                    ustar = header[257:262] == b"ustar"
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if ustar else ""
                    if prefix:
                        name = f"{prefix}/{name}"
            except UnicodeDecodeError as err:
                raise ShardError(f"shard {path} is corrupt: a member name that is not UTF-8 (header at byte "
                                 f"{member_offset}: {err})") from None
            long_name = None
            yield name, data


def _next_header(f: _ForwardReader, start: int) -> int | None:
    """Offset of the first 512-byte block at or after ``start`` that is a valid ustar/GNU header, else None; the
    reader is left at that header."""
    pos = start
    while True:
        chunk = f.read(1 << 20)
        if len(chunk) < 512:
            return None
        usable = len(chunk) - len(chunk) % 512
        for i in range(0, usable, 512):
            block = chunk[i : i + 512]
            if block[257:262] == b"ustar" and _checksum_ok(block):
                f.unread(chunk[i:])
                return pos + i
        f.unread(chunk[usable:])
        pos += usable


def _checksum_ok(header: bytes) -> bool:
    field = header[148:156].split(b"\0", 1)[0].strip(b" ")
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as 8 spaces
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    return stored == unsigned or stored == unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])


def _parse_header(path: str | os.PathLike, header: bytes, offset: int) -> tuple[int, bytes]:
    """(data size, type flag) of a 512-byte tar header, after checking its checksum (as tar and tarfile do)."""
    if not _checksum_ok(header):
        raise ShardError(f"shard {path} is corrupt: the tar header at byte {offset} fails its checksum (damaged "
                         "bytes, or not a tar file)")
    size_field = header[124:136]
    if size_field[0] & 0x80:  # base-256 size (GNU, > 8 GiB)
        return int.from_bytes(size_field[1:], "big"), header[156:157]
    try:
        return int(size_field.split(b"\0", 1)[0].strip(b" ") or b"0", 8), header[156:157]
    except ValueError:
        raise ShardError(f"shard {path} is corrupt: the tar header at byte {offset} has a size field that is not "
                         f"octal ({size_field!r})") from None


def _compressed_members(path: str | os.PathLike, f: Any, headers_only: bool) -> Iterator[tuple[str, bytes]]:
    """The members of a gzip/bzip2/xz tar through ``tarfile``; damage raises ShardError with the offset in the
    uncompressed stream."""
    import lzma

    tar = None
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    data = tar.extractfile(member) if not headers_only else None
                    yield member.name, data.read() if data is not None else b""
    except (tarfile.TarError, EOFError, zlib.error, OSError, lzma.LZMAError, ValueError) as err:
        where = f"byte {tar.offset} of the uncompressed tar" if tar is not None else "its start"
        raise ShardError(f"shard {path} is corrupt or truncated at {where}: {type(err).__name__}: {err}") from None


def iter_shard(path: str | os.PathLike, count: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in tar order: ``{"__key__", "__shard__", ext: bytes, ...}``.

    A remote shard that fails to fetch (a cut connection, a failing command: ``FetchError``) is read again from its
    start, past the samples already given, up to ``FETCH_ATTEMPTS`` times; then the error stops the reader. Its
    samples are never taken for lost, which would train a silently short epoch.
    """
    given = 0
    for attempt in range(FETCH_ATTEMPTS):
        try:
            for j, raw in enumerate(_read_shard(path, count)):
                if j >= given:
                    given += 1
                    yield raw
            return
        except FetchError as err:
            _retrying(str(path), attempt, err, given)


def _read_shard(path: str | os.PathLike, count: int | None = None) -> Iterator[dict[str, Any]]:
    """One read of ``iter_shard``: the samples of one shard, with what damage does to them.

    Without ``count``, damage raises ShardError (shard path and byte offset) after the samples before it. With
    ``count`` (the shard's index.json count) damage is skipped and counted: a sample with a corrupt member is
    dropped and reading resumes at the next valid tar header; a truncated shard ends early. The stream still has
    ``count`` samples: each missing one becomes a placeholder ``{"__key__", "__shard__", "__error__": reason}``
    that the loader drops from its batch, as it drops a sample that fails to decode, so the read plan's positions
    (and exact resume) stay valid. One warning per read names the shard, the byte offset and the number lost.
    """
    shard = shard_name(str(path))
    damaged: list[str] | None = [] if count is not None else None
    noted = 0  # damage messages already acted on
    lost: set[str] = set()  # keys whose members the damage may have cut: the samples are dropped whole
    current: dict[str, Any] | None = None
    produced = 0
    try:
        for name, data in _tar_members(path, damaged=damaged):
            key, ext = sample_key(name)
            if damaged and len(damaged) > noted:  # a corrupt header was skipped just before this member: the
                noted = len(damaged)  # lost member belonged to the sample before it, this one, or one in between
                lost.add(key)
                if current is not None:
                    lost.add(current["__key__"])
                    current = None
            if key in lost:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                    produced += 1
                current = {"__key__": key, "__shard__": shard}
            current[ext] = data
        if damaged and len(damaged) > noted:
            current = None
    except ShardError as err:
        if damaged is None or isinstance(err, FetchError):  # a failed fetch is no damage: the shard is read again
            raise
        damaged.append(str(err))
        if current is not None and (err.member is None or sample_key(err.member)[0] == current["__key__"]):
            current = None  # the sample the damage cut through (or may have) is incomplete
    if current is not None:
        yield current
        produced += 1
    if count is None:
        return
    if produced < count and not damaged:
        if not is_local(str(path)):  # a stream that ended early without damage: never a silently short epoch
            raise ShardError(f"shard {path} delivered {produced} samples, fewer than the {count} its count says "
                             "(index.json, _stats.json or the cached count): the stream ended early, or the shard "
                             f"changed since it was counted (delete its entry in {cache_dir('shard_counts')} to "
                             "count again)")
        damaged.append(f"shard {path} holds {produced} samples, fewer than the {count} its index.json lists")
    if damaged:
        lost = f"skipping its last {count - produced} of {count} samples" if produced < count else "samples skipped"
        warnings.warn(f"{'; '.join(damaged)}: {lost} (rewrite the shard to get them back)", stacklevel=2)
    for j in range(produced, count):
        yield {"__key__": f"{shard}#missing{j}", "__shard__": shard, "__error__": damaged[0]}


class ShardWriter:
    """Write one shard through webdataset's ``TarWriter`` to a temporary name; ``commit()`` renames it into place, so
    a killed run leaves no partial tar.

    Use as a context manager: an exception inside the block deletes the temporary file instead of committing.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from webdataset import TarWriter

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        # an integer mtime keeps headers plain ustar (no pax record per member); the fields are bytes already
        self._tar = TarWriter(self._file, encoder=False, mode=0o644, mtime=int(time.time()))
        self.count = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: ``fields`` maps extension (``png``, ``txt``, ``json``, ``latent_mean.npy``) to bytes."""
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample keys must not contain dots: {key!r}")
        self._tar.write({"__key__": key, **fields})
        self.count += 1

    def commit(self) -> None:
        """Finish the tar, fsync it and rename it into place; on failure (a full disk) nothing is left behind."""
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Delete the temporary file (errors closing it, such as a full disk, are dropped: the file goes anyway)."""
        try:
            self._tar.close()
        except OSError:
            pass
        finally:
            try:
                self._file.close()
            except OSError:
                pass
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def clean_temporaries(directory: str | os.PathLike) -> int:
    """Remove leftover ``.*.tmp*`` files of killed runs; returns how many were removed."""
    removed = 0
    for p in Path(directory).glob(".*.tmp*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


# ----------------------------------------------------------------------------------------------------------------
# The read plan: who reads which shard, in which order, and how many batches an epoch has.


def _rng(*parts: Any) -> random.Random:
    """An RNG seeded by a tuple, stable across processes and Python runs (string seeds hash with sha512)."""
    return random.Random("/".join(str(p) for p in parts))


def shuffle_buffer(samples: Iterable[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Webdataset-style reservoir shuffle: keep ``size`` samples, emit a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict[str, Any]] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class ReadPlan:
    """Deterministic assignment of shards to (rank, worker) slots and the batch order of an epoch.

    ``num_workers`` is the number of logical workers (``max(1, DataLoader num_workers)``). Non-resampled: shard
    ``perm[j]`` goes to rank ``j % world_size`` and, within the rank, to worker ``(j // world_size) % num_workers``;
    the assignment is fixed across epochs (so the epoch length is too) and only the order within a worker changes.
    Each worker yields batches of its own samples (its last one partial unless ``drop_last``); the rank's batches
    interleave workers round robin, skipping finished ones, exactly as ``torch.utils.data.DataLoader`` does. The
    epoch length per rank is the minimum over ranks, so every rank gets the same number of batches.
    Resampled: every worker draws shards with replacement from all shards, forever; the epoch length is
    ``epoch_length`` batches per rank (default: total samples / (world_size x batch_size)).
    """

    shards: tuple[str, ...]
    counts: tuple[int, ...]
    batch_size: int
    world_size: int = 1
    num_workers: int = 1
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 0
    resampled: bool = False
    drop_last: bool = False
    epoch_length: int | None = None
    buckets: tuple[tuple[int, ...], ...] | None = None  # per shard, the bucket of each sample (ldm.data.buckets)

    def check(self) -> None:
        """Refuse layouts that would leave a rank or worker without data (the classic DDP hang)."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if sum(self.counts) == 0:
            first = f" ({self.shards[0]}, ...)" if self.shards else ""
            raise ConfigError(f"the shard set{first} holds no samples ({len(self.shards)} shard(s)): nothing to read. "
                              f"Make shards with samples: {MAKE_SHARDS_HOW}")
        if self.resampled:
            return
        need = self.world_size * self.num_workers
        if len(self.shards) < need:
            raise ValueError(
                f"{len(self.shards)} shard(s) for {self.world_size} rank(s) x {self.num_workers} worker(s) = {need} "
                "readers: every reader needs at least one shard. Fix: write more, smaller shards (make_shards "
                "--maxcount), use fewer DataLoader workers, or set resampled=True."
            )
        if self.batches_per_epoch() == 0:
            raise ValueError("an epoch would have 0 batches on some rank: lower batch_size or drop_last=False")

    def slots(self, rank: int) -> list[list[int]]:
        """Shard indices read by each logical worker of ``rank`` (non-resampled mode)."""
        perm = list(range(len(self.shards)))
        if self.shuffle_shards:
            _rng("assign", self.seed).shuffle(perm)
        mine = perm[rank :: self.world_size]
        return [mine[w :: self.num_workers] for w in range(self.num_workers)]

    def worker_batches(self, rank: int) -> list[int]:
        """Batches each logical worker of ``rank`` yields per epoch (non-resampled mode). With buckets a worker
        batches each bucket apart, so it yields the sum over buckets of its samples in the bucket / batch size."""
        out = []
        for slot in self.slots(rank):
            if self.buckets is None:
                sizes = [sum(self.counts[i] for i in slot)]
            else:
                sizes = list(Counter(b for i in slot for b in self.buckets[i]).values())
            out.append(sum(n // self.batch_size if self.drop_last else -(-n // self.batch_size) for n in sizes))
        return out

    def batches_per_epoch(self) -> int:
        """Batches per rank per epoch, equal on every rank."""
        if self.resampled:
            if self.epoch_length is not None:
                return self.epoch_length
            return max(1, sum(self.counts) // (self.world_size * self.batch_size))
        n = min(sum(self.worker_batches(r)) for r in range(self.world_size))
        return n if self.epoch_length is None else min(n, self.epoch_length)

    def order(self, rank: int) -> list[int]:
        """Logical worker of each batch of the epoch, in the order the DataLoader delivers them."""
        n = self.batches_per_epoch()
        if self.resampled:
            return [j % self.num_workers for j in range(n)]
        left = self.worker_batches(rank)
        out: list[int] = []
        w = 0
        while len(out) < n:
            if left[w] > 0:
                out.append(w)
                left[w] -= 1
            w = (w + 1) % self.num_workers
        return out

    def worker_samples(self, rank: int, worker: int, epoch: int) -> Iterator[dict[str, Any]]:
        """The raw sample stream of one logical worker in one epoch (before batching), a function of its arguments."""
        rng = _rng("stream", self.seed, epoch, rank, worker)
        if self.resampled:
            def draw() -> Iterator[dict[str, Any]]:
                while True:
                    yield from self._shard_samples(rng.randrange(len(self.shards)))

            source: Iterable[dict[str, Any]] = draw()
        else:
            slot = list(self.slots(rank)[worker])
            if self.shuffle_shards:
                rng.shuffle(slot)
            source = (s for i in slot for s in self._shard_samples(i))
        yield from shuffle_buffer(source, self.shuffle_buffer, rng)

    def _shard_samples(self, i: int) -> Iterator[dict[str, Any]]:
        """The raw samples of shard ``i``, each with its bucket (``__bucket__``) when the plan has buckets."""
        if self.buckets is None:
            yield from iter_shard(self.shards[i], self.counts[i])
            return
        for sample, bucket in zip(iter_shard(self.shards[i], self.counts[i]), self.buckets[i], strict=True):
            sample["__bucket__"] = bucket
            yield sample

    def groups(self, samples: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """A worker's raw samples in batches: consecutive runs of ``batch_size`` (the last one partial unless
        ``drop_last``); with buckets, each bucket filled apart, a batch leaving as soon as its bucket holds
        ``batch_size`` samples, then the partial ones in bucket order."""
        if self.buckets is None:
            group: list[dict[str, Any]] = []
            for sample in samples:
                group.append(sample)
                if len(group) == self.batch_size:
                    yield group
                    group = []
            if group and not self.drop_last:
                yield group
            return
        pending: dict[int, list[dict[str, Any]]] = {}
        for sample in samples:
            bucket = pending.setdefault(sample["__bucket__"], [])
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                yield bucket
                pending[sample["__bucket__"]] = []
        if not self.drop_last:
            yield from (pending[b] for b in sorted(pending) if pending[b])
