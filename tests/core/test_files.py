"""Tests of covidctnet.core.files: atomic writes leave the old file or the whole new one, CSV and JSON-plain values."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import stat

import numpy as np
import pytest

from covidctnet.core.files import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    read_csv_dicts,
    remove_stale_temps,
    sha256_file,
    to_jsonable,
    write_csv,
)


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "out" / "a.nii.gz"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith(".tmp.nii.gz")  # the writer sees the extension
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["a.nii.gz"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_dir_replaces_the_folder_whole(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.txt").write_text("x")
    with atomic_dir(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
    assert sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    with pytest.raises(ValueError):
        with atomic_dir(folder) as tmp:
            (tmp / "other.bin").write_bytes(b"o")
            raise ValueError
    assert sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the failed temp folder is gone


def test_remove_stale_temps_removes_only_temps(tmp_path):
    (tmp_path / ".a.csv.x1.tmp.csv").write_text("half")
    (tmp_path / ".model.x2.tmp").mkdir()
    (tmp_path / "a.csv").write_text("whole")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".a.csv.x1.tmp.csv", ".model.x2.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_sha256_file_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 100
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_write_csv_sequences_and_mappings(tmp_path):
    write_csv(tmp_path / "a.csv", ["x", "y"], [(1, "a,b"), (2, "")])
    assert (tmp_path / "a.csv").read_bytes() == b'x,y\n1,"a,b"\n2,\n'
    write_csv(tmp_path / "b.csv", ["y", "x"], [{"x": 1, "y": 2, "z": 3}])  # header order; other keys ignored
    assert list(csv.reader((tmp_path / "b.csv").open())) == [["y", "x"], ["2", "1"]]
    write_csv(tmp_path / "c.csv", ["x"], [])
    assert (tmp_path / "c.csv").read_text() == "x\n"


def test_read_csv_dicts_rows_and_one_line_errors(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffstudy_id,label\na,covid\n".encode())  # as Excel saves it: with a BOM
    assert read_csv_dicts(path, KeyError, "labels CSV", "study_id,label") == [{"study_id": "a", "label": "covid"}]
    path.write_text("study_id,label\n")
    with pytest.raises(KeyError, match=r"labels CSV is empty; expected a header 'study_id,label' and rows"):
        read_csv_dicts(path, KeyError, "labels CSV", "study_id,label")
    with pytest.raises(KeyError, match=r"missing\.csv: cannot read labels CSV: No such file"):
        read_csv_dicts(tmp_path / "missing.csv", KeyError, "labels CSV", "study_id,label")


def test_to_jsonable_gives_plain_values():
    class WithDict:
        def to_dict(self):
            return {"k": 1}

    value = to_jsonable({1: (np.float32(0.5), np.int64(3), np.bool_(True)), "a": np.arange(2), "n": math.nan,
                         "i": np.float64(np.inf), "o": WithDict()})
    assert value == {"1": [0.5, 3, True], "a": [0, 1], "n": None, "i": None, "o": {"k": 1}}
    json.dumps(value, allow_nan=False)
    assert type(value["1"][1]) is int and type(value["1"][2]) is bool
