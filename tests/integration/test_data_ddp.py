"""Two CPU ranks (torch.distributed, gloo): disjoint shards, full coverage, equal batch counts, layout check."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import make_shards
from tests.ports import free_port


@contextlib.contextmanager
def _process_group(rank: int, world: int, port: int, out: str) -> Iterator[list]:
    """A gloo group on 127.0.0.1 for the block; what the block appends to the yielded list is gathered from every
    rank and written to ``out`` as JSON by rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        record: list = []
        yield record
        gathered: list = [None] * world
        dist.all_gather_object(gathered, record[0])
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, port: int, shards: str, num_workers: int, out: str) -> None:
    with _process_group(rank, world, port, out) as record:
        dm = ShardDataModule(shards, batch_size=5, num_workers=num_workers, shuffle_buffer=4)
        dm.setup("fit")  # rank and world size come from the process group
        loader = dm.train_dataloader()
        epochs = []
        for _ in range(2):
            batches = [b["key"] for b in loader]
            epochs.append({"batches": len(batches), "keys": [k for b in batches for k in b], "len": len(loader)})
        record.append(epochs)


def _run(shards: Path, num_workers: int, tmp_path: Path) -> list:
    out = tmp_path / f"ddp{num_workers}.json"
    mp.start_processes(_rank_main, args=(2, free_port(), str(shards), num_workers, str(out)), nprocs=2,
                       start_method="fork")
    return json.loads(out.read_text())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_cover_every_sample_once(tmp_path, num_workers):
    shards = tmp_path / "even"
    make_shards("shapes", shards, maxcount=5, length=40, size=8, log=None)  # 8 shards x 5 samples
    ranks = _run(shards, num_workers, tmp_path)
    for epoch in range(2):
        keys = [ranks[r][epoch]["keys"] for r in range(2)]
        assert not set(keys[0]) & set(keys[1])  # disjoint
        assert sorted(keys[0] + keys[1]) == [f"{i:08d}" for i in range(40)]  # together: every sample exactly once
        assert ranks[0][epoch]["batches"] == ranks[1][epoch]["batches"] == ranks[0][epoch]["len"]
    assert ranks[0][0]["keys"] != ranks[0][1]["keys"]  # reshuffled per epoch


def test_two_ranks_equal_batches_on_uneven_shards(tmp_path):
    shards = tmp_path / "uneven"
    make_shards("shapes", shards, maxcount=5, length=23, size=8, log=None)  # 5,5,5,5,3
    ranks = _run(shards, 0, tmp_path)
    r0, r1 = ranks[0][0], ranks[1][0]
    assert r0["batches"] == r1["batches"] == r0["len"] == r1["len"]
    assert not set(r0["keys"]) & set(r1["keys"])
    assert len(r0["keys"]) + len(r1["keys"]) <= 23


def test_rank_world_from_process_group_rejects_too_few_shards(tmp_path):
    shards = tmp_path / "few"
    make_shards("shapes", shards, maxcount=10, length=20, size=8, log=None)  # 2 shards
    dm = ShardDataModule(str(shards), batch_size=4, num_workers=2, world_size=2, rank=1)
    with pytest.raises(ValueError, match=r"2 shard\(s\) for 2 rank\(s\) x 2 worker\(s\)"):
        dm.setup("fit")
    assert torch.distributed.is_available()


def _bucket_rank_main(rank: int, world: int, port: int, shards: str, out: str, cache: str) -> None:
    # a forked child must not enter the OpenMP pool the parent has used (earlier tests ran torch ops): it would
    # wait forever on the parent's threads; these batches (3 x 3 x 80 x 48) are large enough to go parallel
    torch.set_num_threads(1)
    os.environ["LDM_CACHE"] = cache
    with _process_group(rank, world, port, out) as record:
        kw = dict(batch_size=3, image_size=32, shuffle_buffer=4, seed=7, buckets=BUCKETS)
        dm = ShardDataModule(shards, **kw)
        dm.setup("fit")
        loader = dm.train_dataloader()
        epoch = [b for b in loader]
        first = ShardDataModule(shards, **kw)
        first.setup("fit")
        it = iter(first.train_dataloader())
        head = [list(next(it)["key"]) for _ in range(2)]
        resumed = ShardDataModule(shards, **kw)
        resumed.load_state_dict(first.train_dataloader().state_dict())
        resumed.setup("fit")
        tail = [list(b["key"]) for b in resumed.train_dataloader()]
        record.append({"len": len(loader), "keys": [list(b["key"]) for b in epoch],
                       "shapes": [list(b["image"].shape[-2:]) for b in epoch], "resumed": head + tail})


BUCKETS = {"pixels": 64 * 64, "step": 16, "max_ratio": 2.0}


def test_two_ranks_get_equal_bucketed_batches_and_resume_exactly(tmp_path):
    """Buckets make a worker's batch count depend on its images' shapes; every rank still gets the same number of
    batches (the plan knows each sample's bucket before reading), each batch one size, and a resume is exact."""
    import io

    from PIL import Image

    from ldm.data.shards import ShardWriter, write_index

    shards = tmp_path / "mixed"
    shards.mkdir()
    sizes = [(40, 60), (50, 50), (60, 40), (64, 64), (70, 40), (45, 45), (40, 60)]
    entries = []
    for s in range(6):  # unequal bucket mixes per shard: rank 0 and rank 1 hold different histograms
        with ShardWriter(shards / f"{s:06d}.tar") as w:
            for i in range(5 + s % 2):
                n = s * 10 + i
                buf = io.BytesIO()
                Image.new("RGB", sizes[(n * (s + 1)) % len(sizes)], (n, 90, 150)).save(buf, "PNG")
                w.write(f"{n:08d}", {"png": buf.getvalue(), "txt": f"image {n}".encode()})
        entries.append({"name": f"{s:06d}.tar", "count": 5 + s % 2})
    write_index(shards, entries)
    out = tmp_path / "buckets.json"
    mp.start_processes(_bucket_rank_main, args=(2, free_port(), str(shards), str(out), str(tmp_path / "cache")),
                       nprocs=2, start_method="fork")
    r0, r1 = json.loads(out.read_text())
    assert len(r0["keys"]) == len(r1["keys"]) == r0["len"] == r1["len"] > 0
    assert not {k for b in r0["keys"] for k in b} & {k for b in r1["keys"] for k in b}
    allowed = [[80, 48], [64, 64], [48, 80]]  # (height, width) of the three buckets
    assert all(shape in allowed for r in (r0, r1) for shape in r["shapes"])
    assert len({tuple(s) for r in (r0, r1) for s in r["shapes"]}) > 1  # several sizes were trained on
    assert r0["resumed"] == r0["keys"] and r1["resumed"] == r1["keys"]
