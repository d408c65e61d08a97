"""``predict --dicom-out``: the SR and Segmentation read back with pydicom/highdicom, checked against the source series
(references, geometry, the report's numbers), and the no-identifier rule for every other output."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import logging
import shutil
import subprocess
import uuid

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.config import disable_value_validation
from dicom_utils import copy_series, enhanced_ct
from model_factories import tiny_predict_model

from covidctnet import CLASS_NAMES
from covidctnet.cli import cli
from covidctnet.inference import dicom_export
from covidctnet.inference.dicom_export import (
    RESEARCH_USE,
    SKIPPED_NOT_DICOM,
    derived_frame_of_reference_uid,
    export_study,
    to_source_grid,
)
from covidctnet.inference.slice_scores import ras_lung_mask
from covidctnet.io.volume import read_volume, write_nifti

hd = pytest.importorskip("highdicom")

# identifiers put into the copy of the source series: they must reach the DICOM output and nothing else
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-7355608", "PatientBirthDate": "19700101",
           "AccessionNumber": "ACC-424242"}


@pytest.fixture(scope="module")
def source(dicom_dirs, tmp_path_factory):
    """The real covid series with a patient name, ID, birth date and accession number (the shared copy has none)."""
    def edit(_, ds):
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)

    return copy_series(dicom_dirs["covid"], tmp_path_factory.mktemp("src") / "study-a", edit=edit)


def source_headers(folder):
    """The folder's headers sorted along the slice normal (the volume's k order), read independently of covidctnet."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]
    normal = np.cross(*np.reshape(np.asarray(headers[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(headers, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))


@pytest.fixture(scope="module")
def run(source, tmp_path_factory):
    """``predict --dicom-out`` on the series and on a NIfTI copy of it (which has no DICOM study to join)."""
    root = tmp_path_factory.mktemp("predict")
    model = tiny_predict_model(root / "model")
    volume = read_volume(source)
    write_nifti(volume.array, volume.affine, root / "study-b.nii.gz")
    out, dicom = root / "out", root / "dicom"
    logged = Logged()
    logging.getLogger().addHandler(logged)
    try:
        result = CliRunner().invoke(cli, ["predict", str(source), str(root / "study-b.nii.gz"), "--model",
                                          str(model), "-o", str(out), "--dicom-out", str(dicom), "--device", "cpu",
                                          "--save-residuals"])
    finally:
        logging.getLogger().removeHandler(logged)
    assert result.exit_code == 0, result.output
    rows = {r["study_id"]: r for r in json.loads((out / "report.json").read_text())["studies"]}
    return {"out": out, "dicom": dicom, "rows": rows, "output": result.output + "\n".join(logged.lines)}


class Logged(logging.Handler):
    """Every log record's text, whatever handlers and levels the CLI sets up."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.records.append(record)


def test_report_rows_name_the_dicom_files_and_skip_nifti(run):
    assert run["rows"]["study-a"]["dicom"] == "study-a/SEG.dcm study-a/SR.dcm"
    assert run["rows"]["study-b"]["dicom"] == SKIPPED_NOT_DICOM
    assert sorted(p.name for p in run["dicom"].iterdir()) == ["study-a"]
    assert "study-b: --dicom-out skipped" in run["output"]


def test_sr_holds_the_report_in_the_source_study(run, source):
    src = source_headers(source)
    sr = hd.sr.srread(run["dicom"] / "study-a" / "SR.dcm")
    seg = pydicom.dcmread(run["dicom"] / "study-a" / "SEG.dcm", stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    # same study and patient (copied for the PACS), new series and instance UIDs
    assert sr.StudyInstanceUID == src[0].StudyInstanceUID
    for keyword, value in PATIENT.items():
        assert str(sr[keyword].value) == value
    source_uids = {str(d.SOPInstanceUID) for d in src} | {str(src[0].SeriesInstanceUID)}
    assert sr.SeriesInstanceUID not in source_uids and sr.SOPInstanceUID not in source_uids
    assert len({sr.SeriesInstanceUID, seg.SeriesInstanceUID, sr.SOPInstanceUID, seg.SOPInstanceUID}) == 4
    # evidence: every source instance of the source series, and the Segmentation
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == src[0].StudyInstanceUID
    series = {s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
              for s in study.ReferencedSeriesSequence}
    assert series == {src[0].SeriesInstanceUID: {d.SOPInstanceUID for d in src},
                      seg.SeriesInstanceUID: {seg.SOPInstanceUID}}
    # the three probabilities exactly as report.csv has them, the call, the model and its weights hash
    with open(run["out"] / "report.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["study_id"] == "study-a")
    (group,) = sr.content.get_image_measurement_groups()
    values = {m.name.value: float(m.value) for m in group.get_measurements()}
    assert values == {f"p-{c}": float(row[f"p_{c}"]) for c in CLASS_NAMES}
    (call,) = group.get_qualitative_evaluations()
    assert call.name.meaning == "Predicted class"
    assert call.value.meaning == {"control": "Control (neither COVID-19 nor CAP)", "covid": "COVID-19",
                                  "cap": "Community acquired pneumonia"}[row["predicted"]]
    texts = [i.value for i in hd.sr.utils.find_content_items(sr.content[0], value_type=hd.sr.ValueTypeValues.TEXT,
                                                               recursive=True)]
    assert RESEARCH_USE in texts and row["model"] in texts and row["weights_sha256"] in texts


def frames_by_slice(seg, src):
    """{k: (frame index, plane position)} of the Segmentation's frames, k = the referenced source slice."""
    k_of = {str(d.SOPInstanceUID): k for k, d in enumerate(src)}
    out = {}
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        (ref,) = item.DerivationImageSequence[0].SourceImageSequence
        k = k_of[str(ref.ReferencedSOPInstanceUID)] if len(src) > 1 else int(ref.ReferencedFrameNumber) - 1
        out[k] = (i, [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
    return out


def test_seg_frames_lie_on_their_source_slices_inside_the_lungs(run, source):
    src = source_headers(source)
    seg = hd.seg.segread(run["dicom"] / "study-a" / "SEG.dcm")
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID and seg.SeriesInstanceUID != src[0].SeriesInstanceUID
    assert str(seg.PatientID) == PATIENT["PatientID"]
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [src[0].SeriesInstanceUID]
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in src[0].ImageOrientationPatient])
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in src[0].PixelSpacing])
    assert (seg.Rows, seg.Columns) == (src[0].Rows, src[0].Columns)
    frames = frames_by_slice(seg, src)
    assert frames  # the residual's top 5 % inside the lungs is not empty
    for k, (_, position) in frames.items():
        assert position == pytest.approx([float(v) for v in src[k].ImagePositionPatient])
    # every segmented voxel lies in the lungs of the source, computed here on the source grid
    volume = read_volume(source)
    _, ras_affine, lungs = ras_lung_mask(volume)
    lung_src = np.stack([to_source_grid(lungs.mask > 0, ras_affine, volume.affine, volume.shape, k, order=0) > 0.5
                         for k in range(volume.shape[2])], axis=2)
    pixels = seg.pixel_array
    for k, (i, _) in frames.items():
        segmented = pixels[i].T > 0  # (rows, cols) -> (I, J) = (column, row)
        assert segmented.any() and not (segmented & ~lung_src[:, :, k]).any()


@pytest.mark.parametrize("layout", ["single-frame", "enhanced"])
def test_segment_equals_the_rule_on_the_source_grid(layout, source, tmp_path):
    """With the residual := HU on the lungs' RAS grid (an exact flip/permutation of the source grid), the segment read
    back from the file equals the rule applied on the RAS grid: frame order, transposition and flips are right."""
    folder = source if layout == "single-frame" else enhanced_ct(source, tmp_path / "enhanced").parent
    volume = read_volume(folder)
    hu, ras_affine, lungs = ras_lung_mask(volume)
    export_study(tmp_path / "dcm", "s", volume, {"control": 0.2, "covid": 0.5, "cap": 0.3}, "covid", "m", "0" * 64,
                 hu, ras_affine, lungs.mask, ras_affine)
    inside = lungs.mask > 0
    offset = np.median(hu[inside])
    threshold = np.percentile(np.abs(hu[inside] - offset), dicom_export.SEG_PERCENTILE)
    expected_ras = inside & (hu - offset >= threshold)

    src = source_headers(folder) if layout == "single-frame" else [pydicom.dcmread(next(folder.glob("*.dcm")))]
    seg = hd.seg.segread(tmp_path / "dcm" / "s" / "SEG.dcm")
    got = np.zeros(volume.shape, dtype=bool)
    pixels = seg.pixel_array
    if layout == "enhanced":  # frame numbers of the source file, in the file's (reverse z) order: to the volume's k
        positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                     for f in src[0].PerFrameFunctionalGroupsSequence]
        rank = {frame: k for k, frame in enumerate(np.argsort(positions))}
    for k_or_frame, (i, _) in frames_by_slice(seg, src).items():
        got[:, :, k_or_frame if layout == "single-frame" else rank[k_or_frame]] = pixels[i].T > 0
    got_ras = nib.orientations.apply_orientation(got, nib.orientations.io_orientation(volume.affine))
    assert expected_ras.sum() > 1000
    assert np.array_equal(got_ras, expected_ras)


def test_to_source_grid_follows_the_affines():
    """A linear function of world coordinates sampled on a rotated, flipped, coarser grid comes back exactly."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    values_affine = np.eye(4)
    values_affine[:3, :3] = q @ np.diag([2.0, 1.5, 3.0])
    values_affine[:3, 3] = [5.0, -7.0, 2.0]
    ijk = np.indices((20, 24, 12)).reshape(3, -1)
    world = values_affine[:3, :3] @ ijk + values_affine[:3, 3:]
    coef = np.array([0.3, -1.2, 0.7])
    values = (coef @ world).reshape(20, 24, 12)
    source_affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # a flipped axis
    source_affine[:3, 3] = world.mean(axis=1) - [0, 5, 4]
    for k in range(4):
        sampled = to_source_grid(values, values_affine, source_affine, (10, 10, 4), k)
        i, j = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
        xyz = source_affine[:3, :3] @ np.stack([i.ravel(), j.ravel(), np.full(100, k)]) + source_affine[:3, 3:]
        expected = (coef @ xyz).reshape(10, 10)
        inside = ~np.isnan(sampled)
        assert inside.sum() > 50
        assert np.allclose(sampled[inside], expected[inside], atol=1e-3)
    far = source_affine.copy()
    far[:3, 3] += 1000.0  # a grid a metre away: nothing to sample
    assert np.isnan(to_source_grid(values, values_affine, far, (10, 10, 4), 0)).all()


def test_identifiers_only_in_the_dicom_output(run, source):
    """The patient identifiers and the source UIDs are in the SR and SEG, and in none of the other outputs."""
    first = source_headers(source)[0]
    # (not the birth date: 8 digits may occur by chance in the HTML report's base64 images)
    secrets = [PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["AccessionNumber"], first.StudyInstanceUID,
               first.SeriesInstanceUID, first.SOPInstanceUID]
    files = [p for p in run["out"].rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".csv", ".json", ".gz", ".png"}
    for path in files:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert not [s for s in secrets if s.encode() in data], path
    assert not [s for s in secrets if s in run["output"]]  # the log lines and the printed report
    sr = (run["dicom"] / "study-a" / "SR.dcm").read_bytes()
    assert all(s.encode() in sr for s in PATIENT.values())


def test_without_highdicom_one_line_and_exit_2(dicom_dirs, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else real(name, *a))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(dicom_dirs["covid"]), "-o", str(out), "--dicom-out",
                                      str(tmp_path / "dcm")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["Error: --dicom-out needs highdicom: pip install 'covidctnet[dicom]'"]
    assert not out.exists() and not (tmp_path / "dcm").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
@pytest.mark.parametrize("name", ["SR.dcm", "SEG.dcm"])
def test_dciodvfy_finds_no_error(run, name):
    done = subprocess.run(["dciodvfy", str(run["dicom"] / "study-a" / name)], capture_output=True, text=True,
                          timeout=60, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], lines
    # the only warnings allowed: the local coding scheme of the probabilities, which no standard scheme names
    assert all("99COVIDCTNET" in line for line in lines if line.startswith("Warning")), lines


def dciodvfy(path):
    """dciodvfy's Error and Warning lines for one file."""
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("Error", "Warning"))]


@pytest.fixture(scope="module")
def defective(dicom_dirs, tmp_path_factory):
    """``predict --dicom-out`` on two copies of the covid series with COVID-CT-MD's published defects: ``no-for``
    without a FrameOfReferenceUID; ``bad-uids`` also with a UUID string as StudyInstanceUID and a digits-and-dots
    SeriesInstanceUID longer than 64 characters (SOPInstanceUIDs stay the shared series' own, unique and valid)."""
    root = tmp_path_factory.mktemp("defective")
    uids = {"StudyInstanceUID": str(uuid.uuid4()), "SeriesInstanceUID": f"2.25.{uuid.uuid4().int}.{uuid.uuid4().int}"}
    assert len(uids["SeriesInstanceUID"]) > 64

    def no_for(_, ds):
        ds.FrameOfReferenceUID = ""

    def bad_uids(i, ds):
        no_for(i, ds)
        with disable_value_validation():  # pydicom would warn, quoting each value
            for keyword, value in uids.items():
                setattr(ds, keyword, value)

    sources = {"no-for": copy_series(dicom_dirs["covid"], root / "no-for", edit=no_for),
               "bad-uids": copy_series(dicom_dirs["covid"], root / "bad-uids", edit=bad_uids)}
    model = tiny_predict_model(root / "model")
    logged = Logged()
    logging.getLogger().addHandler(logged)
    try:
        result = CliRunner().invoke(cli, ["predict", *map(str, sources.values()), "--model", str(model), "-o",
                                          str(root / "out"), "--dicom-out", str(root / "dicom"), "--device", "cpu"])
    finally:
        logging.getLogger().removeHandler(logged)
    assert result.exit_code == 0, result.output
    rows = {r["study_id"]: r for r in json.loads((root / "out" / "report.json").read_text())["studies"]}
    return {"dicom": root / "dicom", "rows": rows, "sources": sources, "uids": uids,
            "warnings": [r.getMessage() for r in logged.records if r.name == dicom_export.__name__]}


def test_defective_source_one_warning_each_and_no_value_logged(defective):
    for study in ("no-for", "bad-uids"):
        assert defective["rows"][study]["dicom"] == f"{study}/SEG.dcm {study}/SR.dcm"
        lines = [w for w in defective["warnings"] if w.startswith(f"{study}: ")]
        assert len([w for w in lines if "FrameOfReferenceUID" in w and "cannot be registered" in w]) == 1
        assert len(lines) == (2 if study == "bad-uids" else 1), lines
    (uid_line,) = [w for w in defective["warnings"] if "not DICOM UIDs" in w]
    assert uid_line.startswith("bad-uids: the source's StudyInstanceUID, SeriesInstanceUID are not DICOM UIDs")
    assert not [w for w in defective["warnings"] for v in defective["uids"].values() if v in w]


@pytest.mark.parametrize("study", ["no-for", "bad-uids"])
def test_defective_source_outputs_reference_it_with_a_derived_frame_of_reference(defective, study):
    """The SEG's FrameOfReferenceUID is a valid UID derived from the source series (so a rerun gives the same); the
    SR and SEG keep the source's study and series UIDs as they are, valid or not."""
    with disable_value_validation():
        src = source_headers(defective["sources"][study])
    seg = pydicom.dcmread(defective["dicom"] / study / "SEG.dcm", stop_before_pixels=True)
    sr = pydicom.dcmread(defective["dicom"] / study / "SR.dcm")
    if study == "bad-uids":
        assert src[0].StudyInstanceUID == defective["uids"]["StudyInstanceUID"]
    assert seg.FrameOfReferenceUID == derived_frame_of_reference_uid(src[0].SeriesInstanceUID)
    assert seg.FrameOfReferenceUID.is_valid and not src[0].FrameOfReferenceUID
    other = "bad-uids" if study == "no-for" else "no-for"
    assert seg.FrameOfReferenceUID != pydicom.dcmread(defective["dicom"] / other / "SEG.dcm",
                                                      stop_before_pixels=True).FrameOfReferenceUID
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == src[0].StudyInstanceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [src[0].SeriesInstanceUID]
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == src[0].StudyInstanceUID
    assert src[0].SeriesInstanceUID in {s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
@pytest.mark.parametrize("name", ["SR.dcm", "SEG.dcm"])
@pytest.mark.parametrize("study", ["no-for", "bad-uids"])
def test_dciodvfy_finds_no_error_of_the_outputs_own(defective, study, name):
    """Errors are allowed only where dciodvfy quotes one of the source's invalid UIDs (the outputs reference them as
    they are), with its summary line for them; nothing the IOD requires is missing or empty."""
    lines = dciodvfy(defective["dicom"] / study / name)
    errors = [line for line in lines if line.startswith("Error")]
    bad = list(defective["uids"].values()) if study == "bad-uids" else []
    of_source = [line for line in errors if any(v in line for v in bad)]
    assert bool(of_source) == (study == "bad-uids")
    summary = "Error - Dicom dataset contains invalid data values for Value Representations"
    own = [line for line in errors if line not in of_source and not (of_source and line == summary)]
    assert not own, own
    assert all("99COVIDCTNET" in line for line in lines if line.startswith("Warning")), lines
