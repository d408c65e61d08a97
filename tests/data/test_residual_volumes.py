"""Tests for covidctnet/data/residual_volumes.py: labels, reading checks, splits, augmentation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from covidctnet.core.errors import InputError, LabelError, NonFiniteError, ShapeError, SplitError, UnreadableFileError
from covidctnet.data.residual_volumes import (
    ResidualRecord,
    ResidualVolumeDataset,
    apply_split_file,
    build_augmentation,
    build_records,
    find_residuals,
    read_residual,
    read_split_file,
    split_patients,
    write_split_csv,
)
from covidctnet.io.volume import write_nifti
from covidctnet.models.cnn3d import residual_to_network_input

SIZE, DEPTH = 8, 6


def make_residual_dir(root: Path, ids: list[str], shape=(SIZE, SIZE, DEPTH), statuses: dict | None = None,
                      seed: int = 0) -> Path:
    """A folder laid out like `covidctnet residuals` output: <id>_residual.nii.gz (RAS) + manifest.csv."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for sid in ids:
        status = (statuses or {}).get(sid, "ok")
        name = f"{sid}_residual.nii.gz"
        if status == "ok":
            write_nifti(rng.normal(0, 0.05, shape).astype(np.float32), np.eye(4), root / name)
        rows.append({"study_id": sid, "source": sid, "label": "", "status": status,
                     "error": "" if status == "ok" else "boom", "output": name if status == "ok" else "",
                     "sha256": ""})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------------------------------
# labels


LABEL_CASES = [
    ("control", 0), ("normal", 0), ("CT-0", 0), ("0", 0),
    ("covid", 1), ("COVID-19", 1), ("CT-1", 1), ("ct-4", 1), ("1", 1),
    ("cap", 2), ("pneumonia", 2), ("2", 2),
]


def test_labels_names_numbers_and_aliases(tmp_path):
    ids = [f"s{i:02d}" for i in range(len(LABEL_CASES))]
    res = make_residual_dir(tmp_path / "res", ids)
    rows = [[i, lab] for i, (lab, _) in zip(ids, LABEL_CASES)]
    labels = write_csv(tmp_path / "labels.csv", ["study_id", "label"], rows)
    records = build_records(res, labels)
    assert [r.study_id for r in records] == ids
    assert [r.label for r in records] == [idx for _, idx in LABEL_CASES]
    assert all(r.patient_id == r.study_id for r in records)  # no patient_id column: one patient per study


def test_unknown_label_names_file_and_row(tmp_path):
    res = make_residual_dir(tmp_path / "res", ["a", "b"])
    labels = write_csv(tmp_path / "labels.csv", ["study_id", "label"], [["a", "covid"], ["b", "flu"]])
    with pytest.raises(LabelError, match=r"labels\.csv: row 3: unknown class 'flu'"):
        build_records(res, labels)


def test_patient_id_column_and_unlabelled_studies(tmp_path, caplog):
    res = make_residual_dir(tmp_path / "res", ["a", "b", "c"])
    labels = write_csv(tmp_path / "labels.csv", ["study_id", "label", "patient_id"],
                       [["a", "covid", "P1"], ["b", "covid", "P1"], ["zz", "cap", "P9"]])
    records = build_records(res, labels)
    assert [(r.study_id, r.patient_id) for r in records] == [("a", "P1"), ("b", "P1")]
    assert "no label" in caplog.text and "no 'ok' residual" in caplog.text


def test_manifest_labels_used_without_labels_csv(tmp_path):
    res = make_residual_dir(tmp_path / "res", ["a", "b"])
    text = (res / "manifest.csv").read_text().replace("a,a,,ok", "a,a,CT-2,ok").replace("b,b,,ok", "b,b,normal,ok")
    (res / "manifest.csv").write_text(text)
    assert [r.label for r in build_records(res)] == [1, 0]


def test_residuals_folder_errors(tmp_path):
    with pytest.raises(InputError, match="manifest.csv: missing or empty"):
        find_residuals(tmp_path)
    res = make_residual_dir(tmp_path / "res", ["a", "b"], statuses={"b": "error"})
    paths, _ = find_residuals(res)
    assert list(paths) == ["a"]  # the failed study is not used
    (res / "a_residual.nii.gz").unlink()
    with pytest.raises(UnreadableFileError, match="study a is 'ok' but its file .* is missing"):
        find_residuals(res)


def test_read_residual_checks(tmp_path):
    good = tmp_path / "good_residual.nii.gz"
    write_nifti(np.zeros((SIZE, SIZE, DEPTH), np.float32), np.eye(4), good)
    assert read_residual(good, (SIZE, SIZE, DEPTH)).shape == (SIZE, SIZE, DEPTH)
    with pytest.raises(ShapeError, match=r"good_residual\.nii\.gz: residual shape \(8, 8, 6\), the classifier expects"):
        read_residual(good, (SIZE, SIZE, 50))
    las = tmp_path / "las_residual.nii.gz"
    write_nifti(np.zeros((SIZE, SIZE, DEPTH), np.float32), np.diag([-1.0, 1, 1, 1]), las)
    with pytest.raises(ShapeError, match="orientation is LAS, expected RAS"):
        read_residual(las)
    nan = tmp_path / "nan_residual.nii.gz"
    arr = np.zeros((SIZE, SIZE, DEPTH), np.float32)
    arr[1, 2, 3] = np.nan
    write_nifti(arr, np.eye(4), nan)
    with pytest.raises(NonFiniteError, match="nan_residual"):
        read_residual(nan)
    bad = tmp_path / "bad_residual.nii.gz"
    write_nifti(np.random.default_rng(0).normal(size=(SIZE, SIZE, DEPTH)).astype(np.float32), np.eye(4), bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated download
    with pytest.raises(UnreadableFileError, match="bad_residual.nii.gz: cannot read"):
        read_residual(bad)


# --------------------------------------------------------------------------------------------------------------------
# splits


def _records(n_per_class=(6, 5, 4), studies_per_patient=2) -> list[ResidualRecord]:
    out = []
    for label, n in enumerate(n_per_class):
        for p in range(n):
            pid = f"P{label}{p:02d}"
            for s in range(studies_per_patient):
                out.append(ResidualRecord(f"{pid}_s{s}", Path(f"{pid}_s{s}.nii.gz"), label, pid))
    return out


def test_seeded_split_is_patient_level_stratified_and_reproducible():
    records = _records()
    a = split_patients(records, val_fraction=0.3, test_fraction=0.2, seed=3)
    assert set(a) == {r.study_id for r in records}
    per_patient: dict[str, set[str]] = {}
    for r in records:
        per_patient.setdefault(r.patient_id, set()).add(a[r.study_id])
    assert all(len(s) == 1 for s in per_patient.values())  # no patient in two sets
    for label in range(3):  # every class in every set (each class has >= 4 patients)
        assert {a[r.study_id] for r in records if r.label == label} == {"train", "val", "test"}
    shuffled = list(reversed(records))
    assert split_patients(shuffled, 0.3, 0.2, seed=3) == a  # the input order does not matter
    assert split_patients(records, 0.3, 0.2, seed=4) != a  # the seed does
    n_val_patients = len({r.patient_id for r in records if a[r.study_id] == "val"})
    assert n_val_patients == round(0.3 * 6) + round(0.3 * 5) + round(0.3 * 4)


def test_seeded_split_with_single_patient_classes():
    records = _records((1, 1, 1), studies_per_patient=1)
    a = split_patients(records, val_fraction=0.2, seed=0)
    assert sorted(a.values()) == ["train", "train", "val"]  # not stratifiable: one patient drawn for val
    with pytest.raises(SplitError, match="1 patient"):
        split_patients(records[:1], val_fraction=0.2, seed=0)


def test_split_file_patient_in_two_sets_is_refused(tmp_path):
    records = _records((2, 2, 2))
    rows = [[r.study_id, "train"] for r in records]
    rows[1][1] = "val"  # P000_s1 in val, P000_s0 in train
    split = write_csv(tmp_path / "split.csv", ["study_id", "split"], rows)
    with pytest.raises(SplitError, match=r"split\.csv: patient 'P000' is in two sets: study P000_s0 in train, "
                                         r"study P000_s1 in val"):
        apply_split_file(records, split)


def test_split_file_study_missing_from_residuals(tmp_path):
    records = _records((2, 2, 2))
    rows = [[r.study_id, "val" if r.patient_id.endswith("1") else "train"] for r in records] + [["ghost", "test"]]
    split = write_csv(tmp_path / "split.csv", ["study_id", "split"], rows)
    with pytest.raises(SplitError, match=r"split\.csv: 1 listed study ghost not among the labelled 'ok' residual"):
        apply_split_file(records, split)


def test_split_file_format_errors(tmp_path):
    with pytest.raises(SplitError, match="missing column"):
        read_split_file(write_csv(tmp_path / "a.csv", ["study_id", "set"], [["x", "train"]]))
    with pytest.raises(SplitError, match="row 2: unknown split 'holdout'"):
        read_split_file(write_csv(tmp_path / "b.csv", ["study_id", "split"], [["x", "holdout"]]))
    with pytest.raises(SplitError, match="row 3: study x is listed in train and in val"):
        read_split_file(write_csv(tmp_path / "c.csv", ["study_id", "split"], [["x", "train"], ["x", "validation"]]))


def test_written_split_reads_back(tmp_path):
    records = _records((3, 3, 3))
    a = split_patients(records, 0.34, seed=1)
    write_split_csv(tmp_path / "split.csv", records, a)
    assert read_split_file(tmp_path / "split.csv") == a
    header = (tmp_path / "split.csv").read_text().splitlines()[0]
    assert header == "study_id,patient_id,label,split"


# --------------------------------------------------------------------------------------------------------------------
# dataset and augmentation


def test_dataset_items_and_seeded_augmentation(tmp_path):
    size, depth = 16, 10
    ids = ["a", "b"]
    res = make_residual_dir(tmp_path / "res", ids, shape=(size, size, depth))
    labels = write_csv(tmp_path / "labels.csv", ["study_id", "label"], [["a", "cap"], ["b", "normal"]])
    records = build_records(res, labels)
    plain = ResidualVolumeDataset(records, depth, size)
    item = plain[0]
    assert item["image"].shape == (1, depth, size, size) and int(item["label"]) == 2 and int(item["index"]) == 0
    expected = residual_to_network_input(read_residual(records[0].path))
    assert torch.equal(item["image"], expected)  # no transform: the exact volume

    aug = build_augmentation(flip_prob=0.5, affine_prob=1.0, rotate_deg=10, scale=0.1, translate_frac=0.05,
                             size=(depth, size, size))
    ds = ResidualVolumeDataset(records, depth, size, aug, seed=7)
    first = ds[0]["image"]
    assert first.shape == (1, depth, size, size) and first.dtype == torch.float32
    assert not torch.equal(first, expected)  # the affine (prob 1) changed it
    assert torch.equal(ds[0]["image"], first)  # same (seed, epoch, index): same draw
    assert not torch.equal(ds[1]["image"], residual_to_network_input(read_residual(records[1].path)))
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], first)  # a new epoch draws anew
    ds.set_epoch(0)
    assert torch.equal(ds[0]["image"], first)  # ... and going back reproduces it (exact resume)
    other = ResidualVolumeDataset(records, depth, size, aug, seed=8)
    assert not torch.equal(other[0]["image"], first)


def test_dataset_rejects_wrong_grid(tmp_path):
    res = make_residual_dir(tmp_path / "res", ["a"], shape=(8, 8, 6))
    labels = write_csv(tmp_path / "labels.csv", ["study_id", "label"], [["a", "covid"]])
    ds = ResidualVolumeDataset(build_records(res, labels), depth=50, size_xy=8)
    with pytest.raises(ShapeError, match="a_residual.nii.gz: residual shape"):
        ds[0]
