"""The decoded-once .npy caches and their row reader (covidctnet.io.array_cache)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from covidctnet.core.errors import InputError
from covidctnet.io.array_cache import NpyRows, cached_npy


def _decoder(calls):
    def decode(path):
        calls.append(path)
        return np.load(path).astype(np.float32) * 2

    return decode


def test_cache_is_built_once_and_rebuilt_when_the_source_changes(tmp_path):
    source = tmp_path / "vol.npy"
    np.save(source, np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    calls: list = []
    path = cached_npy(source, tmp_path / "cache", _decoder(calls), name="s1")
    assert path == tmp_path / "cache" / "s1.npy" and len(calls) == 1
    np.testing.assert_array_equal(np.load(path), np.arange(24).reshape(2, 3, 4) * 2)
    assert cached_npy(source, tmp_path / "cache", _decoder(calls), name="s1") == path and len(calls) == 1
    np.save(source, np.ones((2, 3, 4), dtype=np.float32))  # new content: size or mtime changes
    os.utime(source, ns=(1, 1))
    cached_npy(source, tmp_path / "cache", _decoder(calls), name="s1")
    assert len(calls) == 2 and np.load(path).sum() == 48
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp files left


def test_rows_read_the_same_values_as_numpy_and_survive_pickling(tmp_path):
    array = np.random.default_rng(0).random((7, 5, 6), dtype=np.float32)
    np.save(tmp_path / "a.npy", array)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == (7, 5, 6) and len(rows) == 7
    np.testing.assert_array_equal(rows[3], array[3])
    np.testing.assert_array_equal(rows[-1], array[-1])
    np.testing.assert_array_equal(rows.read(2, 5), array[2:5])
    rows[0][:] = 0  # a fresh copy: the reader's later reads are unaffected
    np.testing.assert_array_equal(rows[0], array[0])
    clone = pickle.loads(pickle.dumps(rows))  # as a DataLoader worker receives it
    np.testing.assert_array_equal(clone[6], array[6])
    with pytest.raises(IndexError):
        rows.read(5, 8)


def test_rows_refuse_fortran_order_and_truncated_files(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((3, 4), dtype=np.float32)))
    with pytest.raises(InputError, match="C-ordered"):
        NpyRows(tmp_path / "f.npy")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a readable .npy"):
        NpyRows(tmp_path / "bad.npy")
    np.save(tmp_path / "t.npy", np.ones((4, 100), dtype=np.float32))
    rows = NpyRows(tmp_path / "t.npy")
    with open(tmp_path / "t.npy", "r+b") as fh:
        fh.truncate(rows.offset + 2 * 400 + 10)
    with pytest.raises(InputError, match="truncated"):
        rows[3]
