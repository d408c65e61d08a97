"""The command group: instant help, one-line errors, and `covidctnet preprocess` end to end on real scans."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from dicom_utils import copy_series

from covidctnet.cli import cli
from covidctnet.io.batch import read_manifest

REPO = Path(__file__).resolve().parents[2]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom covidctnet.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'monai', 'nibabel', 'SimpleITK') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.fixture(scope="module")
def preprocessed(dicom_dirs, nifti_ct, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    result = run("preprocess", dicom_dirs["covid"], dicom_dirs["control"], nifti_ct, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_preprocess_outputs_and_manifest(preprocessed):
    rows = {r["study_id"]: r for r in read_manifest(preprocessed / "manifest.csv")}
    assert set(rows) == {"covid-P001", "control-normal001", "totalseg_example_ct_sm"}
    for sid, row in rows.items():
        assert row["status"] == "ok" and row["error"] == ""
        img = nib.load(preprocessed / row["output"])
        assert img.shape[:2] == (240, 240) and img.get_data_dtype() == np.float32
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert row["output_shape"] == "x".join(map(str, img.shape))
    assert rows["covid-P001"]["input_shape"] == "512x512x32"
    assert (preprocessed / "preprocess.yaml").is_file()


def test_resume_skips_done_studies(preprocessed, dicom_dirs, nifti_ct):
    before = {p.name: p.stat().st_mtime_ns for p in preprocessed.glob("*.nii.gz")}
    result = run("preprocess", dicom_dirs["covid"], dicom_dirs["control"], nifti_ct, "-o", preprocessed)
    assert result.exit_code == 0
    assert "0 done, 3 already done" in result.output
    assert before == {p.name: p.stat().st_mtime_ns for p in preprocessed.glob("*.nii.gz")}


def test_workers_give_identical_bytes(preprocessed, dicom_dirs, nifti_ct, tmp_path):
    result = run("preprocess", dicom_dirs["covid"], dicom_dirs["control"], nifti_ct, "-o", tmp_path, "--workers", 2)
    assert result.exit_code == 0, result.output
    for f in preprocessed.glob("*.nii.gz"):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
    strip = lambda rows: sorted((r["study_id"], r["sha256"]) for r in rows)  # noqa: E731
    assert strip(read_manifest(tmp_path / "manifest.csv")) == strip(read_manifest(preprocessed / "manifest.csv"))


def test_profile_official_and_size_override(nifti_ct, tmp_path):
    result = run("preprocess", nifti_ct, "-o", tmp_path, "--profile", "official")
    assert result.exit_code == 0, result.output
    assert nib.load(tmp_path / "totalseg_example_ct_sm.nii.gz").shape[:2] == (128, 128)
    result = run("preprocess", nifti_ct, "-o", tmp_path / "s", "--size", 64)
    assert nib.load(tmp_path / "s" / "totalseg_example_ct_sm.nii.gz").shape[:2] == (64, 64)


def _bad_inputs(dicom_dirs, nifti_ct, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input of the preprocess issue, built from the real files: (path, expected message part)."""
    cases: dict[str, tuple[Path, str]] = {}
    tmp.mkdir()
    trunc = tmp / "truncated.nii.gz"
    trunc.write_bytes(nifti_ct.read_bytes()[:30000])
    cases["truncated"] = (trunc, "truncated")
    (tmp / "empty").mkdir()
    cases["empty folder"] = (tmp / "empty", "folder is empty")

    def mr(i, ds):
        ds.Modality = "MR"

    cases["MR"] = (copy_series(dicom_dirs["cap"], tmp / "mr", edit=mr), "not CT")
    cases["few slices"] = (copy_series(dicom_dirs["cap"], tmp / "few", keep=lambda i: i < 8), "8 slices")
    cases["missing slice"] = (copy_series(dicom_dirs["cap"], tmp / "gap", keep=lambda i: i != 20), "gap of 4 mm")
    img = nib.load(nifti_ct)
    arr = img.get_fdata().astype(np.float32)
    unit = (arr - arr.min()) / (arr.max() - arr.min())
    nib.save(nib.Nifti1Image(unit, img.affine), str(tmp / "unit.nii.gz"))
    cases["not HU"] = (tmp / "unit.nii.gz", "expected Hounsfield")
    arr[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(tmp / "nan.nii.gz"))
    cases["NaN"] = (tmp / "nan.nii.gz", "NaN")
    return cases


def test_each_bad_input_gives_one_line_and_no_output(dicom_dirs, nifti_ct, tmp_path):
    for name, (path, message) in _bad_inputs(dicom_dirs, nifti_ct, tmp_path / "bad").items():
        out = tmp_path / f"out-{name}"
        result = run("preprocess", path, "-o", out)
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0] and str(path) in errors[0], (name, result.output)
        assert "Traceback" not in result.output
        assert not out.exists(), name


def test_bad_study_in_batch_is_recorded(dicom_dirs, nifti_ct, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(nifti_ct.read_bytes()[:30000])
    result = run("preprocess", nifti_ct, bad, "-o", tmp_path / "out")
    assert result.exit_code == 1
    rows = {r["study_id"]: r for r in read_manifest(tmp_path / "out" / "manifest.csv")}
    assert rows["broken"]["status"] == "error" and "truncated" in rows["broken"]["error"]
    assert rows["totalseg_example_ct_sm"]["status"] == "ok"
    assert not (tmp_path / "out" / "broken.nii.gz").exists()


def test_bad_config_is_one_line(nifti_ct, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size_xy: big\n")
    result = run("preprocess", nifti_ct, "-o", tmp_path / "o", "--config", cfg)
    assert result.exit_code == 2
    assert "'size_xy' must be an integer" in result.output and "Traceback" not in result.output


MARKERS = {
    "PatientName": "ZZMARKNAME^QQ",
    "PatientID": "ZZMARKID77",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ZZMARKACC55",
    "InstitutionName": "ZZMARKINST",
    "StudyDate": "19020304",
}


def test_no_patient_identifiers_in_outputs(dicom_dirs, tmp_path):
    def plant(i, ds):
        for tag, value in MARKERS.items():
            setattr(ds, tag, value)

    folder = copy_series(dicom_dirs["control"], tmp_path / "in" / "P9", edit=plant)
    result = run("-v", "preprocess", folder, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    blobs = [result.output.encode()] + [p.read_bytes() for p in (tmp_path / "o").iterdir()]
    for f in (tmp_path / "o").glob("*.nii.gz"):
        blobs.append(np.asarray(nib.load(f).header.binaryblock).tobytes())
    for value in MARKERS.values():
        assert not any(value.encode() in b for b in blobs), value


def test_sigkill_then_resume_equals_uninterrupted(dicom_dirs, nifti_ct, preprocessed, tmp_path):
    """Kill `covidctnet preprocess` once the first output exists; the resumed run equals an uninterrupted one."""
    exe = str(Path(sys.executable).with_name("covidctnet"))
    inputs = [str(dicom_dirs["covid"]), str(dicom_dirs["control"]), str(nifti_ct)]
    out = tmp_path / "killed"
    proc = subprocess.Popen([exe, "preprocess", *inputs, "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "manifest.csv").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run("preprocess", *inputs, "-o", out)
    assert result.exit_code == 0, result.output
    assert not list(out.glob(".*.tmp*"))  # the killed write's temp file was cleaned up
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(p.name for p in preprocessed.glob("*.nii.gz"))
    for f in preprocessed.glob("*.nii.gz"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert (out / "manifest.csv").read_text() == (preprocessed / "manifest.csv").read_text()
