"""``load_npy`` (the latent cache's array reader, whose header parse is cached) against numpy's ``np.load``: the same
arrays for every layout np.save writes, writable, and a clear error for damaged members."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ldm.data.transforms import load_npy, npy_bytes


def saved(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    if version is None:
        np.save(buf, array, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


rng = np.random.default_rng(0)
ARRAYS = {
    "float32 latent": rng.standard_normal((4, 8, 8)).astype(np.float32),
    "float16": rng.standard_normal((3, 5)).astype(np.float16),
    "float64 scalar": np.array(2.5),
    "empty": np.zeros((0, 7), dtype=np.float32),
    "int64": rng.integers(-5, 5, (6,)),
    "bool mask": rng.random((2, 77)) > 0.5,
    "big-endian": rng.standard_normal((3, 4)).astype(">f4"),
    "fortran order": np.asfortranarray(rng.standard_normal((5, 3)).astype(np.float32)),
    "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
}


@pytest.mark.parametrize("version", [None, (1, 0), (2, 0)])
@pytest.mark.parametrize("name", list(ARRAYS))
def test_load_npy_reads_what_np_load_reads(name, version):
    data = saved(ARRAYS[name], version)
    for _ in range(2):  # the second read takes the cached header
        ours, reference = load_npy(data), np.load(io.BytesIO(data), allow_pickle=False)
        assert ours.dtype == reference.dtype and ours.shape == reference.shape
        assert ours.flags.f_contiguous == reference.flags.f_contiguous
        np.testing.assert_array_equal(ours, reference)
        assert ours.flags.writeable  # torch.from_numpy warns on read-only arrays
        ours[...] = 0  # and it is a copy: the shard's bytes are untouched
        np.testing.assert_array_equal(np.load(io.BytesIO(data), allow_pickle=False), reference)


def test_load_npy_reads_npy_bytes_output():
    array = rng.standard_normal((4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(load_npy(npy_bytes(array)), array)


def test_arrays_with_the_same_header_are_read_apart():
    a, b = np.arange(6, dtype=np.float32), np.arange(6, 12, dtype=np.float32)
    np.testing.assert_array_equal(load_npy(saved(a)), a)
    np.testing.assert_array_equal(load_npy(saved(b)), b)


def test_a_truncated_member_names_the_damage():
    data = saved(rng.standard_normal((4, 8, 8)).astype(np.float32))
    with pytest.raises(ValueError, match=r"holds 1020 bytes of data, but its header declares \(4, 8, 8\) float32 "
                                         r"\(1024 bytes\): the shard is damaged"):
        load_npy(data[:-4])
    with pytest.raises(ValueError, match="not a .npy member"):
        load_npy(b"PNG\x00" * 8)


def test_object_arrays_are_refused_as_numpy_refuses_them():
    buf = io.BytesIO()  # np.save writes object arrays only with pickling allowed
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_npy(data)
