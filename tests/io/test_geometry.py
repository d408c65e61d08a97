"""Header geometry of NIfTI and NRRD files (issue 18): refused with one line, or read with a warning saying which
transform is used, never with a made-up default.

Every file is the real shared CT (TotalSegmentator ``example_ct_sm``: 122x101x30, 3 mm, sform code 2, qform code 0)
with its header edited by nibabel, or written to NRRD by SimpleITK and edited.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from covidctnet.cli import cli
from covidctnet.core.errors import ShapeError
from covidctnet.io.checks import check_volume
from covidctnet.io.volume import read_volume

LOGGER = "covidctnet.io.volume"


def _write(src: Path, out: Path, edit) -> Path:
    """Copy the real NIfTI with ``edit(header, affine)`` applied to its header bytes as written.

    nibabel "fixes" a header it is given (a 0 mm pixdim becomes 1 mm) before saving, so the edited header's 348 bytes
    replace those of a normally saved copy instead."""
    img = nib.load(src)
    plain = out.with_name("plain_" + out.name)
    nib.save(img, str(plain))
    raw = gzip.decompress(plain.read_bytes())
    plain.unlink()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    edit(header, img.affine)
    out.write_bytes(gzip.compress(header.binaryblock + raw[348:], mtime=0))
    return out


def _raw(path: Path):
    with nib.openers.ImageOpener(str(path)) as fobj:
        return nib.Nifti1Header.from_fileobj(fobj, check=False)


def _pixdim(axis: int, value: float):
    def edit(h, affine):
        h["pixdim"][axis] = value

    return edit


def _qform_only_zero_slices(h, affine):
    """The issue's file: only a qform (an older converter), 0 mm between slices in pixdim."""
    h.set_qform(affine, code=1)
    h.set_sform(None, code=0)
    h["pixdim"][3] = 0


def _no_transform(h, affine):
    h.set_qform(None, code=0)
    h.set_sform(None, code=0)


def _singular_sform(h, affine):
    a = affine.copy()
    a[:3, 2] = 0
    h.set_sform(a, code=1)
    h.set_qform(None, code=0)


def _nan_sform_no_qform(h, affine):
    a = affine.copy()
    a[0, 3] = np.nan
    h.set_sform(a, code=1)
    h.set_qform(None, code=0)


REFUSED = {
    "pixdim-k-zero": (_pixdim(3, 0.0), r"voxel size 0 mm along k in the header \(pixdim\[3\]\)"),
    "pixdim-i-negative": (_pixdim(1, -3.0), r"voxel size -3 mm along i in the header \(pixdim\[1\]\)"),
    "pixdim-j-nan": (_pixdim(2, np.nan), r"voxel size nan mm along j in the header \(pixdim\[2\]\)"),
    "pixdim-k-inf": (_pixdim(3, np.inf), r"voxel size inf mm along k"),
    "pixdim-k-absurd": (_pixdim(3, 50.0), r"voxel size 50 mm along k in the header \(pixdim\[3\]\) but 3 mm in the "
                                          r"sform; readers disagree"),
    "pixdim-k-absurd-small": (_pixdim(3, 1e-6), r"voxel size 1e-06 mm along k .* but 3 mm in the sform"),
    "qform-only-zero-slice-spacing": (_qform_only_zero_slices, r"voxel size 0 mm along k"),
    "no-qform-no-sform": (_no_transform, r"neither the sform \(sform_code 0, not set\) nor the qform \(qform_code 0, "
                                         r"not set\) gives a valid geometry"),
    "singular-sform-no-qform": (_singular_sform, r"neither the sform \(singular"),
    "nan-sform-no-qform": (_nan_sform_no_qform, r"neither the sform \(not finite\)"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_bad_nifti_geometry_is_refused(nifti_ct, tmp_path, caplog, kind):
    edit, problem = REFUSED[kind]
    path = _write(nifti_ct, tmp_path / f"{kind}.nii.gz", edit)
    with pytest.raises(ShapeError, match=re.escape(str(path)) + ": " + problem):
        read_volume(path)
    # nibabel's own "setting 0 dims to 1" fix is never reached, so never printed
    assert "dims to 1" not in caplog.text


def test_qform_and_sform_disagree_the_sform_is_used(nifti_ct, tmp_path, caplog):
    def edit(h, affine):
        moved = affine.copy()
        moved[:3, 3] += [0.0, 0.0, 10.0]  # the qform puts the scan 10 mm higher: more than a 3 mm voxel
        h.set_qform(moved, code=1)
        h.set_sform(affine, code=1)

    path = _write(nifti_ct, tmp_path / "disagree.nii.gz", edit)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    vol = read_volume(path)
    np.testing.assert_allclose(vol.affine, nib.load(nifti_ct).affine, atol=1e-4)
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert f"{path}: qform and sform disagree by 10 mm (more than a voxel, 3 mm); using the sform" in line


def test_qform_and_sform_within_a_voxel_is_silent(nifti_ct, tmp_path, caplog):
    def edit(h, affine):
        moved = affine.copy()
        moved[:3, 3] += [0.5, 0.0, 0.0]
        h.set_qform(moved, code=1)
        h.set_sform(affine, code=1)

    caplog.set_level(logging.WARNING, logger=LOGGER)
    read_volume(_write(nifti_ct, tmp_path / "close.nii.gz", edit))
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_invalid_sform_falls_back_to_a_valid_qform(nifti_ct, tmp_path, caplog):
    def edit(h, affine):
        h.set_qform(affine, code=1)
        bad = affine.copy()
        bad[:3, 1] = 0
        h.set_sform(bad, code=1)

    path = _write(nifti_ct, tmp_path / "bad_sform.nii.gz", edit)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    vol = read_volume(path)
    np.testing.assert_allclose(vol.affine, nib.load(nifti_ct).affine, atol=1e-4)
    assert "the sform is invalid (singular (a zero voxel size or two parallel axes)); using the qform" in caplog.text


@pytest.mark.parametrize("where", ["slice", "in-plane"])
def test_sheared_affine_is_refused(nifti_ct, tmp_path, where):
    def edit(h, affine):
        sheared = affine.copy()
        if where == "slice":
            sheared[1, 2] = 0.75  # each 3 mm slice moves 0.75 mm along y: a 14 degree gantry tilt kept in the sform
        else:
            sheared[0, 1] = 0.75  # rows not perpendicular to columns
        h.set_sform(sheared, code=1)
        h["pixdim"][1:4] = np.linalg.norm(sheared[:3, :3], axis=0)

    path = _write(nifti_ct, tmp_path / f"shear_{where}.nii.gz", edit)
    vol = read_volume(path)
    problem = ("sheared affine: the slice axis k is 14.0 degrees off" if where == "slice"
               else "voxel axes i and j meet at 76.0")
    with pytest.raises(ShapeError, match=re.escape(f"{path}: {problem}")):
        check_volume(vol)


# ---- NRRD: SimpleITK writes the real CT, the header is edited as text


def _nrrd(nifti_ct: Path, out: Path, directions: str | None) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(nifti_ct)), str(out), useCompression=False)
    if directions is None:
        return out
    head, sep, body = out.read_bytes().partition(b"\n\n")
    head = re.sub(rb"space directions: [^\n]*", b"space directions: " + directions.encode(), head)
    out.write_bytes(head + sep + body)
    return out


def test_nrrd_zero_spacing_is_refused(nifti_ct, tmp_path):
    path = _nrrd(nifti_ct, tmp_path / "zero.nrrd", "(-3,0,0) (0,-3,0) (0,0,0)")
    problem = f"{path}: voxel size 0 mm along k in the header (space directions)"
    with pytest.raises(ShapeError, match=re.escape(problem)):
        read_volume(path)


@pytest.mark.parametrize("value, shown", [("3 3 -3", "-3"), ("3 3 nan", "nan"), ("3 0 3", "0")])
def test_metaimage_bad_spacing_is_refused(nifti_ct, tmp_path, value, shown):
    """ITK would read a negative ElementSpacing as positive and "nan" as 0: the header text is checked first."""
    import SimpleITK as sitk

    path = tmp_path / "ct.mha"
    sitk.WriteImage(sitk.ReadImage(str(nifti_ct)), str(path), useCompression=False)
    raw = path.read_bytes()
    path.write_bytes(re.sub(rb"ElementSpacing = [^\n]*", b"ElementSpacing = " + value.encode(), raw, count=1))
    axis = "j" if value == "3 0 3" else "k"
    with pytest.raises(ShapeError, match=re.escape(f"{path}: voxel size {shown} mm along {axis} in the header "
                                                   "(ElementSpacing)")):
        read_volume(path)


def test_nrrd_without_voxel_size_is_refused(nifti_ct, tmp_path):
    path = _nrrd(nifti_ct, tmp_path / "nospacing.nrrd", None)
    head, sep, body = path.read_bytes().partition(b"\n\n")
    head = re.sub(rb"\n(space directions|space origin|space): [^\n]*", b"", head)
    path.write_bytes(head + sep + body)
    with pytest.raises(ShapeError, match=re.escape(f"{path}: no voxel size in the header")):
        read_volume(path)


def test_nrrd_sheared_is_refused(nifti_ct, tmp_path):
    path = _nrrd(nifti_ct, tmp_path / "shear.nrrd", "(-3,0,0) (0,-3,0) (0,0.75,3)")
    with pytest.raises(ShapeError, match=re.escape(f"{path}: sheared affine")):
        check_volume(read_volume(path))


def test_clean_nrrd_and_nifti_pass(nifti_ct, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for path in (nifti_ct, _nrrd(nifti_ct, tmp_path / "ct.nrrd", None)):
        check_volume(read_volume(path))
    assert not [r for r in caplog.records if r.name == LOGGER]


# ---- end to end: one line, exit 2, nothing written


@pytest.mark.parametrize("kind", ["pixdim-k-zero", "pixdim-k-absurd", "no-qform-no-sform", "shear", "nrrd-zero"])
def test_cli_refuses_with_one_line_and_writes_nothing(nifti_ct, tmp_path, kind):
    if kind == "shear":
        def edit(h, affine):
            sheared = affine.copy()
            sheared[1, 2] = 0.75
            h.set_sform(sheared, code=1)
            h["pixdim"][1:4] = np.linalg.norm(sheared[:3, :3], axis=0)

        path, problem = _write(nifti_ct, tmp_path / "shear.nii.gz", edit), "sheared affine"
    elif kind == "nrrd-zero":
        path, problem = _nrrd(nifti_ct, tmp_path / "zero.nrrd", "(-3,0,0) (0,-3,0) (0,0,0)"), "voxel size 0 mm"
    else:
        edit, problem = REFUSED[kind]
        path = _write(nifti_ct, tmp_path / f"{kind}.nii.gz", edit)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["preprocess", str(path), "-o", str(out), "--size", "64"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(path) in errors[0] and re.search(problem, errors[0]), result.output
    assert "Traceback" not in result.output and "dims to 1" not in result.output
    assert not out.exists()


def test_written_headers_are_what_the_tests_say(nifti_ct, tmp_path):
    """The test files really carry the faults (nibabel writes a header given with ``affine=None`` unchanged)."""
    h = _raw(_write(nifti_ct, tmp_path / "z.nii.gz", _qform_only_zero_slices))
    assert h["pixdim"][3] == 0 and h["qform_code"] == 1 and h["sform_code"] == 0
