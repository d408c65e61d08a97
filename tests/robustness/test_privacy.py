"""No patient identifier leaves covidctnet: markers planted in the identifying DICOM tags of copies of the real shared
series must not appear in any output file (NIfTI headers and gzip contents included), manifest, report, PNG, the
console output or the log, for preprocess, residuals and predict, on good studies and on studies that fail.

(``tests/cli/test_cli.py::test_no_patient_identifiers_in_outputs`` checks preprocess alone; this extends it to the later
stages, more tags, error paths and the debug log.)
"""

from __future__ import annotations

import gzip
import logging
import warnings
from pathlib import Path

import pytest
from dicom_utils import copy_series
from robust_cases import (
    SIZE,
    error_lines,
    invoke,
)

# tag -> a value found nowhere else (dates keep the DICOM DA form, so pydicom writes them as real dates)
MARKERS = {
    "PatientName": "QZXNAME^MARKER",
    "PatientID": "QZXPID4711",
    "PatientBirthDate": "19010203",
    "PatientAddress": "QZXADDR 1 Marker Street",
    "OtherPatientIDs": "QZXOTHERID",
    "AccessionNumber": "QZXACC0815",
    "InstitutionName": "QZXINSTITUTE",
    "InstitutionAddress": "QZXINSTADDR",
    "ReferringPhysicianName": "QZXDOCTOR^REF",
    "OperatorsName": "QZXOPERATOR",
    "StudyID": "QZXSTUDY9",
    "StudyDate": "19020304",
    "SeriesDate": "19030405",
    "AcquisitionDate": "19040506",
    "ContentDate": "19050607",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plant(i: int, ds) -> None:
    for tag, value in MARKERS.items():
        setattr(ds, tag, value)


def _plant_mr(i: int, ds) -> None:
    _plant(i, ds)
    ds.Modality = "MR"


@pytest.fixture(scope="module")
def marked(tmp_path_factory, dicom_dirs) -> dict[str, Path]:
    """Copies of the real series with every marker planted: two good ones, one MR (refused) and one with a missing
    slice (refused). Folder names are neutral: the study id comes from them."""
    root = tmp_path_factory.mktemp("marked")
    return {
        "case01": copy_series(dicom_dirs["control"], root / "case01", edit=_plant),
        "case02": copy_series(dicom_dirs["covid"], root / "case02", edit=_plant),
        "case03": copy_series(dicom_dirs["cap"], root / "case03", edit=_plant_mr),
        "case04": copy_series(dicom_dirs["cap"], root / "case04", edit=_plant, keep=lambda i: i != 20),
    }


def _texts(path: Path) -> list[bytes]:
    """What a reader of ``path`` could see: its bytes, its decompressed bytes (.gz: the NIfTI header and voxels),
    and the text chunks of a PNG."""
    data = path.read_bytes()
    blobs = [data]
    if path.name.endswith(".gz"):
        blobs.append(gzip.decompress(data))
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as img:
            blobs.append(repr(img.info).encode())
    return blobs


def _leaks(blob: bytes) -> list[str]:
    return [tag for tag, value in MARKERS.items() if value.encode() in blob or value.replace("^", " ").encode() in blob]


def test_planted_markers_are_in_the_input(marked):
    """The markers really are in the DICOM files the commands read (so not finding them below means something)."""
    import pydicom

    first = next(marked["case01"].glob("*.dcm"))
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    assert {tag: str(getattr(ds, tag)) for tag in MARKERS} == MARKERS
    assert _leaks(b"".join(_texts(first))) == list(MARKERS)  # the byte search finds every one of them


def test_no_identifier_in_outputs_or_logs(marked, ws, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    scans = list(marked.values())
    out = {name: tmp_path / name for name in ("pre", "res", "pred")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [
            invoke("-vv", "preprocess", *scans, "-o", out["pre"], "--size", SIZE),
            invoke("-vv", "residuals", out["pre"], "-o", out["res"], "--denoiser", ws.denoiser, "--device", "cpu"),
            invoke("-vv", "predict", *scans, "--model", ws.model, "-o", out["pred"], "--save-residuals",
                   "--device", "cpu"),
        ]
    # the runs did their work: two studies done and two refused (with one line each) by preprocess and predict
    assert [r.exit_code for r in results] == [1, 0, 1], [r.output for r in results]
    assert all(len(error_lines(r)) == 2 for r in (results[0], results[2]))
    assert sorted(p.name for p in out["pre"].glob("*.nii.gz")) == ["case01.nii.gz", "case02.nii.gz"]
    assert sorted(p.name for p in out["pred"].glob("*_residual.nii.gz")) == ["case01_residual.nii.gz",
                                                                              "case02_residual.nii.gz"]
    # the log was captured (the -vv debug log holds the per-study lines), so an absent marker is a real absence
    log = caplog.text
    assert "case01: 512x512x32 voxels" in log and "case02:" in log

    files = sorted(p for folder in out.values() for p in folder.rglob("*") if p.is_file())
    assert {"manifest.csv", "preprocess.yaml", "residuals.yaml", "report.csv", "report.json",
            "case01_overlay.png"} <= {p.name for p in files}
    leaks = {str(p): tags for p in files if (tags := _leaks(b"".join(_texts(p))))}
    assert leaks == {}
    console = "".join(r.output for r in results)
    assert _leaks(console.encode()) == [] and _leaks(log.encode()) == []
    assert _leaks("\n".join(str(w.message) for w in caught).encode()) == []
