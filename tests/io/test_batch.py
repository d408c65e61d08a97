"""covidctnet.io.batch: discovery, labels from the MosMed layout, manifest, resume, error isolation."""

from __future__ import annotations

import shutil

import pytest

from covidctnet.core.errors import InputError
from covidctnet.io.batch import discover_studies, read_manifest, run_batch


def _ok(study, out_dir):
    (out_dir / f"{study.study_id}.txt").write_text(study.study_id)
    return {"output": f"{study.study_id}.txt", "extra": "x"}


def _fail_on_b(study, out_dir):
    if study.study_id == "b":
        raise ValueError("boom")
    return _ok(study, out_dir)


def _kill_worker(study, out_dir):
    import os

    os._exit(3)  # as the OOM killer would end the worker process


def _shape_error_without_file(study, out_dir):
    from covidctnet.core.errors import ShapeError

    raise ShapeError("BCDUNet needs height and width divisible by 8, got 60x60")  # as raised inside a network


def _input_error_naming_file(study, out_dir):
    raise InputError(f"{study.path}: 3 NaN voxels")


def test_error_rows_always_name_the_study_file(tmp_path):
    """A library error raised without the file name still gives a one-line error naming the study; one that names
    it is kept as is (not prefixed twice)."""
    studies = _studies(tmp_path, ["a"])
    (row,) = run_batch(studies, tmp_path / "o1", _shape_error_without_file).rows
    assert row["error"] == f"{studies[0].path}: BCDUNet needs height and width divisible by 8, got 60x60"
    (row,) = run_batch(studies, tmp_path / "o2", _input_error_naming_file).rows
    assert row["error"] == f"{studies[0].path}: 3 NaN voxels"


def test_mosmed_layout_gives_labels(nifti_ct, dicom_dirs, tmp_path):
    root = tmp_path / "MosMed"
    for cat, sid in (("CT-0", "study_0001"), ("CT-3", "study_0002")):
        (root / "studies" / cat).mkdir(parents=True)
        shutil.copyfile(nifti_ct, root / "studies" / cat / f"{sid}.nii.gz")
    shutil.copytree(dicom_dirs["cap"], root / "cap" / "P7")
    studies = {s.study_id: s for s in discover_studies([root])}
    assert studies["study_0001"].label == "control"
    assert studies["study_0002"].label == "covid"
    assert studies["study_0002"].source == "studies/CT-3/study_0002.nii.gz"
    assert studies["P7"].label == "cap" and studies["P7"].path.is_dir()


def test_missing_input_and_empty_root(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        discover_studies([tmp_path / "nope"])
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no NIfTI"):
        discover_studies([tmp_path / "root"])


def _studies(tmp_path, names):
    files = []
    for n in names:
        p = tmp_path / "in" / f"{n}.nii.gz"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
        files.append(p)
    return discover_studies(files)


def test_error_isolated_and_resume(tmp_path):
    studies = _studies(tmp_path, ["a", "b", "c"])
    out = tmp_path / "out"
    summary = run_batch(studies, out, _fail_on_b, ["extra"])
    assert (summary.n_ok, summary.n_failed) == (2, 1)
    rows = {r["study_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows["b"]["status"] == "error" and "ValueError: boom" in rows["b"]["error"]
    assert rows["a"]["status"] == "ok" and len(rows["a"]["sha256"]) == 64 and rows["a"]["extra"] == "x"
    assert not (out / "b.txt").exists()
    # Resume: a and c are skipped; b is retried and now succeeds.
    summary = run_batch(studies, out, _ok, ["extra"])
    assert (summary.n_ok, summary.n_skipped, summary.n_failed) == (1, 2, 0)
    # A changed output is redone.
    (out / "a.txt").write_text("tampered")
    summary = run_batch(studies, out, _ok, ["extra"])
    assert (summary.n_ok, summary.n_skipped) == (1, 2)
    assert (out / "a.txt").read_text() == "a"


def test_all_failed_leaves_nothing(tmp_path):
    studies = _studies(tmp_path, ["b"])
    summary = run_batch(studies, tmp_path / "out", _fail_on_b)
    assert summary.n_failed == 1
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_are_errors(tmp_path):
    a = tmp_path / "x" / "s.nii.gz"
    b = tmp_path / "y" / "s.nii.gz"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"x")
    summary = run_batch(discover_studies([a, b]), tmp_path / "out", _ok)
    assert (summary.n_ok, summary.n_failed) == (1, 1)
    assert "duplicate study id" in summary.errors[0]


def test_a_killed_worker_fails_its_study_in_one_row(tmp_path):
    """A worker process that dies (e.g. killed for memory) makes its study a whole error row naming the study; the
    batch itself goes on and reports it."""
    studies = _studies(tmp_path, ["b"])
    summary = run_batch(studies, tmp_path / "out", _kill_worker, workers=1)
    (row,) = summary.rows
    assert summary.n_failed == 1
    assert (row["study_id"], row["source"], row["status"]) == ("b", studies[0].source, "error")
    assert row["error"] == f"{studies[0].path}: worker process died (out of memory?); rerun with fewer --workers"
