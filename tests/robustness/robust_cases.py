"""Building blocks of the robustness corpus: bad inputs made from the real shared scans, tiny models, CLI checks.

Nothing here is committed data: every bad input is derived, inside the test's temporary folder, from the real files in
the shared data folder (``tests/conftest.py`` fixtures). Each builder returns the path a user would pass to the CLI,
and each case names the file the one-line error must name and a regular expression for the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner, Result
from dicom_utils import copy_series
from model_factories import DEPTH, SIZE, tiny_denoiser_dir, tiny_predict_model

from covidctnet.cli import cli
from covidctnet.core import files

__all__ = [
    "Sources",
    "Workspace",
    "workspace_at",
    "session_dir",
    "ScanCase",
    "SCAN_CASES",
    "invoke",
    "invoke_ok",
    "error_lines",
    "assert_one_line_error",
    "snapshot",
    "tiny_denoiser_dir",
    "tiny_predict_model",
    "write_csv",
    "two_series_folder",
    "denoiser_run",
    "SIZE",
    "DEPTH",
    "CONTROL",
]

CONTROL = "control-normal001"  # the study id of the real control series (the denoiser trains on it)


@dataclass(frozen=True)
class Sources:
    """The real shared files every bad input is made from."""

    dicom: dict[str, Path]  # {'covid', 'cap', 'control'} -> 32-slice DICOM series folders
    nifti: Path  # 122x101x30 int16 CT, 3 mm, RAS
    ucsd: Path  # UCSD COVID-CT 2D slices (8-bit PNG/JPEG)


# --------------------------------------------------------------------------------------------------------------------
# running the CLI


def invoke(*args: Any) -> Result:
    """Run ``covidctnet ARGS`` in-process, as a user would type it (exceptions are caught and kept in the result)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def invoke_ok(*args: Any) -> Result:
    """Run ``covidctnet ARGS`` and require success (for building valid inputs)."""
    result = invoke(*args)
    assert result.exit_code == 0, f"covidctnet {' '.join(map(str, args))} failed:\n{result.output}"
    return result


def error_lines(result: Result) -> list[str]:
    """The lines of the command's output that start with ``Error:``."""
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def assert_one_line_error(result: Result, culprit: str | Path, problem: str, exit_code: int = 2) -> str:
    """The command failed cleanly: ``exit_code``, exactly one ``Error:`` line naming ``culprit`` and matching the
    ``problem`` regex, no traceback and no uncaught exception. Returns the error line."""
    unexpected = result.exception if not isinstance(result.exception, SystemExit) else None
    assert unexpected is None, f"uncaught {type(unexpected).__name__}: {unexpected}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == exit_code, f"exit code {result.exit_code}, expected {exit_code}\n{result.output}"
    lines = error_lines(result)
    assert len(lines) == 1, f"expected one 'Error:' line, got {len(lines)}\n{result.output}"
    line = lines[0]
    assert str(culprit) in line, f"the error does not name {culprit}: {line}"
    assert re.search(problem, line), f"the error does not say /{problem}/: {line}"
    return line


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (to prove a failed command changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A small CSV file (labels, splits), written by the library's own CSV writer."""
    files.write_csv(path, header, rows)
    return path


# --------------------------------------------------------------------------------------------------------------------
# bad scans, derived from the real ones


def _nifti_like(src: Path, array: np.ndarray, dst: Path, affine: np.ndarray | None = None) -> Path:
    img = nib.load(src)
    nib.save(nib.Nifti1Image(array, img.affine if affine is None else affine), str(dst))
    return dst


def _ct_array(src: Path) -> np.ndarray:
    return np.asarray(nib.load(src).dataobj).astype(np.float32)


def _truncated_nifti(s: Sources, tmp: Path) -> Path:
    out = tmp / "truncated.nii.gz"
    out.write_bytes(s.nifti.read_bytes()[:30000])  # the gzip stream ends in the middle of the voxels
    return out


def _wrong_magic(s: Sources, tmp: Path) -> Path:
    raw = bytearray(gzip.decompress(s.nifti.read_bytes()))
    assert raw[344:348] == b"n+1\0"  # the NIfTI-1 magic of a single-file image
    raw[344:348] = b"XXXX"
    out = tmp / "wrong_magic.nii.gz"
    out.write_bytes(gzip.compress(bytes(raw), mtime=0))
    return out


def _png_named_nifti(s: Sources, tmp: Path) -> Path:
    out = tmp / "slice_png.nii.gz"  # an image file given the NIfTI extension: not even gzip
    shutil.copyfile(sorted((s.ucsd / "CT_COVID").glob("*.png"))[0], out)
    return out


def _zero_bytes(s: Sources, tmp: Path) -> Path:
    out = tmp / "zero.nii.gz"
    out.write_bytes(b"")
    return out


def _unknown_type(s: Sources, tmp: Path) -> Path:
    out = tmp / "scan.txt"
    out.write_text(f"CT scan: {s.nifti}\n")
    return out


def _empty_folder(s: Sources, tmp: Path) -> Path:
    out = tmp / "empty_study"
    out.mkdir()
    return out


def _folder_without_dicom(s: Sources, tmp: Path) -> Path:
    out = tmp / "notes_only"
    out.mkdir()
    (out / "README.txt").write_text("the scans are on another disk\n")
    return out


def _single_dicom_file(s: Sources, tmp: Path) -> Path:
    out = tmp / "one_file"
    out.mkdir()
    shutil.copyfile(s.dicom["cap"] / "0010.dcm", out / "0010.dcm")
    return out / "0010.dcm"


def _truncated_dicom_slice(s: Sources, tmp: Path) -> Path:
    folder = copy_series(s.dicom["cap"], tmp / "broken_slice")
    f = folder / "0010.dcm"
    f.write_bytes(f.read_bytes()[:3000])
    return folder


def _mr_modality(s: Sources, tmp: Path) -> Path:
    def to_mr(i: int, ds: Any) -> None:
        ds.Modality = "MR"

    return copy_series(s.dicom["cap"], tmp / "mr_series", edit=to_mr)


def _missing_slices(s: Sources, tmp: Path) -> Path:
    return copy_series(s.dicom["covid"], tmp / "gap", keep=lambda i: i not in (15, 16))


def _no_image_position(s: Sources, tmp: Path) -> Path:
    def drop(i: int, ds: Any) -> None:
        del ds.ImagePositionPatient

    return copy_series(s.dicom["cap"], tmp / "no_position", edit=drop)


def _series_uid_per_file_two_stacks(s: Sources, tmp: Path) -> Path:
    """An anonymiser's SeriesInstanceUID per file over two interleaved stacks (every other slice 0.7 mm off)."""

    def edit(i: int, ds: Any) -> None:
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.999.{i + 1}"
        if i % 2:
            ds.ImagePositionPatient = list(ds.ImagePositionPatient[:2]) + [float(ds.ImagePositionPatient[2]) + 0.7]

    return copy_series(s.dicom["cap"], tmp / "uid_per_file_mixed", edit=edit)


def _duplicated_positions(s: Sources, tmp: Path) -> Path:
    def dup(i: int, ds: Any) -> None:
        if i == 9:  # slice 9 claims the position of slice 8
            ds.ImagePositionPatient = list(ds.ImagePositionPatient[:2]) + [float(ds.ImagePositionPatient[2]) - 2.0]

    return copy_series(s.dicom["covid"], tmp / "duplicated", edit=dup)


def _uneven_spacing(s: Sources, tmp: Path) -> Path:
    def uneven(i: int, ds: Any) -> None:
        z = float(ds.ImagePositionPatient[2])  # gaps alternate 2.9 mm / 1.1 mm
        ds.ImagePositionPatient = list(ds.ImagePositionPatient[:2]) + [z + (0.9 if i % 2 else 0.0)]

    return copy_series(s.dicom["covid"], tmp / "uneven", edit=uneven)


def _gantry_tilt(s: Sources, tmp: Path) -> Path:
    def tilt(i: int, ds: Any) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * i, z]  # 0.5 mm per 2 mm slice: about 14 degrees

    return copy_series(s.dicom["covid"], tmp / "tilted", edit=tilt)


def _image_2d(s: Sources, tmp: Path) -> Path:
    return _nifti_like(s.nifti, _ct_array(s.nifti)[:, :, 15], tmp / "axial_slice.nii.gz")


def _single_slice(s: Sources, tmp: Path) -> Path:
    return copy_series(s.dicom["control"], tmp / "one_slice", keep=lambda i: i == 16)


def _few_slices(s: Sources, tmp: Path) -> Path:
    return _nifti_like(s.nifti, _ct_array(s.nifti)[:, :, :8], tmp / "slab.nii.gz")


def _png_volume(s: Sources, tmp: Path) -> Path:
    from PIL import Image

    files = sorted((s.ucsd / "CT_COVID").glob("*.png"))[:24]
    stack = np.stack([np.asarray(Image.open(f).convert("L").resize((128, 128))) for f in files], axis=-1)
    return _nifti_like(s.nifti, stack.astype(np.uint8), tmp / "png_stack.nii.gz", np.diag([0.7, 0.7, 2.0, 1.0]))


def _unit_range(s: Sources, tmp: Path) -> Path:
    a = _ct_array(s.nifti)
    return _nifti_like(s.nifti, (a - a.min()) / (a.max() - a.min()), tmp / "normalised.nii.gz")


def _nan_voxels(s: Sources, tmp: Path) -> Path:
    a = _ct_array(s.nifti)
    a[60, 50, 10:13] = np.nan
    return _nifti_like(s.nifti, a, tmp / "nan.nii.gz")


def _inf_voxels(s: Sources, tmp: Path) -> Path:
    a = _ct_array(s.nifti)
    a[60, 50, 20] = np.inf
    a[61, 50, 20] = -np.inf
    return _nifti_like(s.nifti, a, tmp / "inf.nii.gz")


def _four_d(s: Sources, tmp: Path) -> Path:
    a = _ct_array(s.nifti)
    return _nifti_like(s.nifti, np.stack([a, a], axis=-1), tmp / "two_phases.nii.gz")


def _rgb_nrrd(s: Sources, tmp: Path) -> Path:
    import SimpleITK as sitk

    grey = sitk.ReadImage(str(s.nifti))
    out = tmp / "rgb.nrrd"
    sitk.WriteImage(sitk.Compose([grey, grey, grey]), str(out))
    return out


def _spacing(mm: float) -> Callable[[Sources, Path], Path]:
    def build(s: Sources, tmp: Path) -> Path:
        img = nib.load(s.nifti)
        affine = img.affine.copy()
        affine[:3, 2] *= mm / np.linalg.norm(affine[:3, 2])
        # nibabel cannot build a qform from a singular affine: write the sform alone, as broken converters do
        out_img = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header.copy())
        out_img.header.set_sform(affine, code=1)
        out_img.header.set_qform(None, code=0)
        zooms = list(out_img.header.get_zooms())
        zooms[2] = mm
        out_img.header.set_zooms(zooms)
        out = tmp / f"spacing_{mm:g}mm.nii.gz"
        nib.save(out_img, str(out))
        return out

    return build


@dataclass(frozen=True)
class ScanCase:
    """A bad scan: how to make it from the real ones and what the error must say (regex)."""

    build: Callable[[Sources, Path], Path]
    problem: str


SCAN_CASES: dict[str, ScanCase] = {
    "truncated-nii-gz": ScanCase(_truncated_nifti, r"cannot read NIfTI .*truncated"),
    "wrong-magic-bytes": ScanCase(_wrong_magic, r"cannot read NIfTI .*truncated or not be NIfTI"),
    "png-named-nii-gz": ScanCase(_png_named_nifti, r"cannot read NIfTI .*not a gzip file.*not be NIfTI"),
    "zero-byte-file": ScanCase(_zero_bytes, r"file is empty \(0 bytes\)"),
    "unknown-file-type": ScanCase(_unknown_type, r"unknown file type"),
    "empty-folder": ScanCase(_empty_folder, r"folder is empty"),
    "folder-without-dicom": ScanCase(_folder_without_dicom, r"no NIfTI/NRRD files or DICOM series found"),
    "single-dicom-file": ScanCase(_single_dicom_file, r"single DICOM file is one slice"),
    "truncated-dicom-slice": ScanCase(_truncated_dicom_slice, r"broken_slice/0010\.dcm: cannot decode pixel data"),
    "mr-modality": ScanCase(_mr_modality, r"Modality is MR, not CT"),
    "missing-slices": ScanCase(_missing_slices, r"gap of 6 mm .*missing"),
    "duplicated-slice-positions": ScanCase(_duplicated_positions, r"duplicated slice position"),
    "no-image-position": ScanCase(_no_image_position, r"ImagePositionPatient \(0020,0032\) missing in 32 of the 32"),
    "series-uid-per-file-two-stacks": ScanCase(_series_uid_per_file_two_stacks,
                                               r"own SeriesInstanceUID, .* not lie on one regular stack"),
    "uneven-spacing": ScanCase(_uneven_spacing, r"uneven slice spacing"),
    "gantry-tilt": ScanCase(_gantry_tilt, r"gantry tilt of 14\.\d degrees"),
    "2d-image-as-volume": ScanCase(_image_2d, r"2-D image of shape \(122, 101\)"),
    "single-slice": ScanCase(_single_slice, r"\b1 slices?; at least 16"),
    "too-few-slices": ScanCase(_few_slices, r"\b8 slices; at least 16"),
    "8bit-png-volume": ScanCase(_png_volume, r"8-bit grey levels.*Hounsfield"),
    "normalised-0-1-volume": ScanCase(_unit_range, r"normalised to \[0, 1\].*Hounsfield"),
    "nan-voxels": ScanCase(_nan_voxels, r"3 NaN and 0 infinite voxels"),
    "inf-voxels": ScanCase(_inf_voxels, r"0 NaN and 2 infinite voxels"),
    "4d-nifti": ScanCase(_four_d, r"4-D series"),
    "rgb-nrrd": ScanCase(_rgb_nrrd, r"3 components per voxel"),
    "spacing-0mm": ScanCase(_spacing(0.0), r"voxel size 0 mm along k"),
    "spacing-100mm": ScanCase(_spacing(100.0), r"voxel size 100 mm along k"),
}
"""Every bad scan of the corpus, by readable id (the test ids)."""


def two_series_folder(s: Sources, tmp: Path) -> tuple[Path, str, str]:
    """A folder holding two CT series of the control scan: 20 slices (series A) and 12 slices (series B).

    Returns:
        ``(folder, uid of the 20-slice series, uid of the 12-slice series)``.
    """
    folder = copy_series(s.dicom["control"], tmp / "two_series", keep=lambda i: i >= 12)
    big_uid = str(pydicom.dcmread(folder / "0013.dcm", stop_before_pixels=True).SeriesInstanceUID)
    small_uid = big_uid + ".2"
    for f in sorted(s.dicom["control"].glob("*.dcm"))[:12]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = small_uid
        ds.save_as(folder / f"b{f.name}")
    return folder, big_uid, small_uid


# --------------------------------------------------------------------------------------------------------------------
# tiny models: see tests/model_factories.py


# --------------------------------------------------------------------------------------------------------------------
# a shared workspace: real scans preprocessed, tiny models, real residuals and predictions (built once per session)


def session_dir(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per test session, in the session's base temp folder.

    A session-scoped fixture imported into several modules would run once per module; a folder marked complete
    is shared instead (a build that failed half-way is redone).
    """
    out = factory.getbasetemp() / f"robust-{name}"
    done = out / ".complete"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        build(out)
        done.touch()
    return out


@dataclass(frozen=True)
class Workspace:
    """Valid inputs of every command, made from the three real DICOM series (see :func:`workspace_at`).

    Attributes:
        root: the folder.
        pre: ``covidctnet preprocess`` of the three series at 64x64 (manifest, preprocess.yaml).
        denoiser: a tiny denoiser model directory for 64x64 data.
        model: a tiny ``predict`` model directory (denoiser + official 3D CNN at 36x64x64).
        residuals: ``covidctnet residuals`` of ``pre`` on a 34x40x40 grid (the smallest the official CNN takes).
        grid_config: a classifier YAML for that grid (depth, size_xy; one epoch).
        labels: labels CSV of the three studies (study_id, label, patient_id).
        report: ``covidctnet predict`` report.csv of the three series.
        ids: the study ids (covid, cap, control).
    """

    root: Path
    sources: Sources

    @property
    def pre(self) -> Path:
        return self.root / "pre"

    @property
    def denoiser(self) -> Path:
        return self.root / "denoiser"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def residuals(self) -> Path:
        return self.root / "residuals"

    @property
    def grid_config(self) -> Path:
        return self.root / "grid.yaml"

    @property
    def labels(self) -> Path:
        return self.root / "labels.csv"

    @property
    def report(self) -> Path:
        return self.root / "predict" / "report.csv"

    @property
    def ids(self) -> dict[str, str]:
        return {label: folder.name for label, folder in self.sources.dicom.items()}


RESIDUAL_GRID = (34, 40)  # (depth, size_xy) of the workspace's residuals


def workspace_at(factory: pytest.TempPathFactory, sources: Sources) -> Workspace:
    """The shared :class:`Workspace`, built through the CLI on first use (about 15 s on a busy 2-core machine)."""

    def build(root: Path) -> None:
        ws = Workspace(root, sources)
        scans = list(sources.dicom.values())
        depth, size = RESIDUAL_GRID
        invoke_ok("preprocess", *scans, "-o", ws.pre, "--size", SIZE)
        tiny_denoiser_dir(ws.denoiser)
        tiny_predict_model(ws.model)
        invoke_ok("residuals", ws.pre, "-o", ws.residuals, "--denoiser", ws.denoiser, "--depth", depth,
                  "--size", size, "--device", "cpu")
        invoke_ok("predict", *scans, "--model", ws.model, "-o", ws.report.parent, "--device", "cpu")
        ws.grid_config.write_text(f"depth: {depth}\nsize_xy: {size}\nepochs: 1\nbatch_size: 2\n")
        ids = ws.ids
        write_csv(ws.labels, ["study_id", "label", "patient_id"],
                  [[ids["covid"], "COVID-19", "P1"], [ids["cap"], "cap", "P2"], [ids["control"], "normal", "P3"]])

    return Workspace(session_dir(factory, "workspace", build), sources)


def denoiser_run(factory: pytest.TempPathFactory, ws: Workspace) -> Path:
    """A real one-epoch ``covidctnet train-denoiser`` run (tiny BCDU-Net, one step) on the control series, with its
    checkpoints, config.yaml, data.yaml and model/ (shared by the tests that damage a copy of it)."""
    import yaml

    def build(root: Path) -> None:
        cfg = root / "tiny.yaml"
        cfg.write_text(yaml.safe_dump({"features": 4, "batch_size": 4, "steps_per_epoch": 1, "val_batch_size": 16,
                                       "slices_per_study": 12, "sample_png": False, "epochs": 1}))
        invoke_ok("train-denoiser", ws.pre, "-o", root / "run", "--config", cfg, "--studies", CONTROL,
                  "--device", "cpu")

    return session_dir(factory, "denoiser-run", build) / "run"
