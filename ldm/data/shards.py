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

import io
import json
import os
import random
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_NAME = "index.json"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(spec: str) -> list[str]:
    """Expand ``{000000..000009}`` ranges (zero padding kept) and ``{a,b,c}`` lists, as webdataset URLs do."""
    m = _BRACE.search(spec)
    if m is None:
        return [spec]
    head, body, tail = spec[: m.start()], m.group(1), spec[m.end() :]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        parts = body.split(",")
    return [out for part in parts for out in expand_braces(head + part + tail)]


def sample_key(member_name: str) -> tuple[str, str]:
    """Split a tar member name into (key, extension) at the first dot of its base name (webdataset convention)."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return member_name, ""
    return (f"{directory}/{stem}" if directory else stem), ext


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """Load a shard directory's ``index.json`` ({shards: [{name, count}], total, ...})."""
    with open(Path(directory) / INDEX_NAME) as f:
        return json.load(f)


def write_index(directory: str | os.PathLike, shards: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write ``index.json`` atomically; ``shards`` is a list of {name, count, ...} in shard order."""
    index = {"shards": shards, "total": int(sum(s["count"] for s in shards)), **extra}
    atomic_write_bytes(Path(directory) / INDEX_NAME, json.dumps(index, indent=1).encode())
    return index


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary name and ``os.replace`` so readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def count_samples(path: str | os.PathLike) -> int:
    """Number of distinct keys in a shard (reads the tar headers only)."""
    with tarfile.open(path, "r") as tar:
        return len({sample_key(m.name)[0] for m in tar.getmembers() if m.isfile()})


def resolve_shards(spec: str | os.PathLike | Iterable[str]) -> tuple[list[str], list[int]]:
    """Shard paths and sample counts from a directory (its index.json), a brace pattern, or a list of paths.

    Without an index the counts are read from the tar headers (local files only).
    """
    if isinstance(spec, str | os.PathLike) and Path(spec).is_dir():
        directory = Path(spec)
        if (directory / INDEX_NAME).exists():
            index = read_index(directory)
            return [str(directory / s["name"]) for s in index["shards"]], [int(s["count"]) for s in index["shards"]]
        paths = sorted(str(p) for p in directory.glob("*.tar"))
    elif isinstance(spec, str | os.PathLike):
        paths = expand_braces(str(spec))
    else:
        paths = [p for s in spec for p in expand_braces(str(s))]
    if not paths:
        raise ValueError(f"no shards found for {spec!r}")
    counts: list[int] = []
    for p in paths:
        index_path = Path(p).parent / INDEX_NAME
        known = _index_counts(index_path)
        counts.append(known[Path(p).name] if Path(p).name in known else count_samples(p))
    return paths, counts


_INDEX_CACHE: dict[str, dict[str, int]] = {}


def _index_counts(index_path: Path) -> dict[str, int]:
    key = str(index_path)
    if key not in _INDEX_CACHE:
        try:
            with open(index_path) as f:
                _INDEX_CACHE[key] = {s["name"]: int(s["count"]) for s in json.load(f)["shards"]}
        except (OSError, ValueError, KeyError):
            _INDEX_CACHE[key] = {}
    return _INDEX_CACHE[key]


def _tar_members(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an uncompressed tar, in order; a small reader (ustar, GNU long names,
    pax path records) several times faster than ``tarfile`` for many small members. Compressed tars go to
    ``tarfile``."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head in (b"\x1f\x8b", b"BZ", b"\xfd7"):  # gzip / bzip2 / xz
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if member.isfile():
                        data = tar.extractfile(member)
                        yield member.name, data.read() if data is not None else b""
            return
        long_name: str | None = None
        while True:
            header = f.read(512)
            if len(header) < 512 or header == bytes(512):
                return
            size_field = header[124:136]
            if size_field[0] & 0x80:  # base-256 size (GNU, > 8 GiB)
                size = int.from_bytes(size_field[1:], "big")
            else:
                size = int(size_field.strip(b"\0 ") or b"0", 8)
            kind = header[156:157]
            data = f.read(size)
            f.seek((-size) % 512, 1)
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
            if kind not in (b"0", b"\0", b"7"):
                long_name = None
                continue
            name = long_name
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
                if prefix:
                    name = f"{prefix}/{name}"
            long_name = None
            yield name, data


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in tar order: ``{"__key__", "__shard__", ext: bytes, ...}``."""
    current: dict[str, Any] | None = None
    shard = Path(path).name
    for name, data in _tar_members(path):
        key, ext = sample_key(name)
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__shard__": shard}
        current[ext] = data
    if current is not None:
        yield current


class ShardWriter:
    """Write one shard to a temporary name; ``commit()`` renames it into place, so a killed run leaves no partial tar.

    Use as a context manager: an exception inside the block deletes the temporary file instead of committing.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self.count = 0
        self._mtime = int(time.time())  # an integer mtime keeps headers plain ustar (no pax record per member)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: ``fields`` maps extension (``png``, ``txt``, ``json``, ``latent_mean.npy``) to bytes."""
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample keys must not contain dots: {key!r}")
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self._mtime
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()
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

    def check(self) -> None:
        """Refuse layouts that would leave a rank or worker without data (the classic DDP hang)."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
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
        """Batches each logical worker of ``rank`` yields per epoch (non-resampled mode)."""
        out = []
        for slot in self.slots(rank):
            n = sum(self.counts[i] for i in slot)
            out.append(n // self.batch_size if self.drop_last else -(-n // self.batch_size))
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
                    yield from iter_shard(self.shards[rng.randrange(len(self.shards))])

            source: Iterable[dict[str, Any]] = draw()
        else:
            slot = list(self.slots(rank)[worker])
            if self.shuffle_shards:
                rng.shuffle(slot)
            source = (s for i in slot for s in iter_shard(self.shards[i]))
        yield from shuffle_buffer(source, self.shuffle_buffer, rng)
