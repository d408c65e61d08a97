"""`covidctnet slice-scores`: one row per original slice, z from ImagePositionPatient, chest-coverage check, batch."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from covidctnet.cli import cli
from covidctnet.core.slice_table import SLICE_COLUMNS, read_slices_csv
from covidctnet.inference.slice_scores import SliceScoresConfig, residual_statistics
from covidctnet.preprocessing.lungmask3d import mask_to_grid
from covidctnet.models.registry import DEMO_MODEL
from tests.data_paths import require_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ipp_z(folder):
    return sorted(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
                  for p in folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The 32-slice P001 excerpt and the abdomen CT scored with the bundled model (one run for the module)."""
    out = tmp_path_factory.mktemp("ss") / "out"
    result = CliRunner().invoke(cli, ["slice-scores", str(require_data("ct-dicom", "covid-P001")),
                                      str(require_data("ct-nifti", "totalseg_example_ct_sm.nii.gz")),
                                      "--model", str(DEMO_MODEL), "-o", str(out), "--device", "cpu"])
    return out, result


def test_one_row_per_original_slice_with_dicom_z(scored):
    out, result = scored
    rows = read_slices_csv(out / "covid-P001_slices.csv")
    folder = require_data("ct-dicom", "covid-P001")
    z = _ipp_z(folder)
    assert len(rows) == len(z) == 32
    assert [r["slice"] for r in rows] == list(range(32))
    np.testing.assert_allclose([r["z_mm"] for r in rows], z, atol=1e-3)  # ImagePositionPatient z, ascending
    header = (out / "covid-P001_slices.csv").read_text().splitlines()[0].split(",")
    assert header[: len(SLICE_COLUMNS)] == list(SLICE_COLUMNS)
    lung = np.array([r["lung_ml"] for r in rows])
    # 2 mm slices through mid-chest: tens of ml of lung each, and the total matches the 3D mask's range
    assert np.all(lung > 5) and 700 < lung.sum() < 3500
    hu = np.array([r["hu_score"] for r in rows])
    assert np.all((hu >= 0) & (hu <= 1))
    res = np.array([r["residual_score"] for r in rows])
    assert np.all(np.isfinite(res))
    np.testing.assert_allclose(res, [r["residual_p95"] for r in rows])  # the default statistic
    assert np.all(np.array([r["residual_mean_pos"] for r in rows]) >= 0)


def test_non_chest_scan_is_refused_with_one_line(scored):
    out, result = scored
    assert result.exit_code == 1, result.output  # one of two studies failed
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "totalseg_example_ct_sm.nii.gz: no lungs found: not a chest CT?" in errors[0]
    assert "Traceback" not in result.output
    assert not (out / "totalseg_example_ct_sm_slices.csv").exists()
    manifest = {r["study_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert manifest["totalseg_example_ct_sm"]["status"] == "error"
    assert manifest["covid-P001"]["status"] == "ok"


def test_only_non_chest_exit_2_and_no_output(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["slice-scores", str(require_data("ct-nifti", "totalseg_example_ct_sm.nii.gz")),
                                      "--model", str(DEMO_MODEL), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.count("no lungs found") == 1
    assert not out.exists()


def test_resume_skips_done_study(scored, tmp_path):
    out, _ = scored
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "covid-P001_slices.csv").stat().st_mtime_ns
    result = CliRunner().invoke(cli, ["slice-scores", str(require_data("ct-dicom", "covid-P001")),
                                      "--model", str(DEMO_MODEL), "-o", str(copy), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1 already done" in result.output
    assert (copy / "covid-P001_slices.csv").stat().st_mtime_ns == before


def test_model_and_denoiser_are_exclusive(tmp_path):
    result = CliRunner().invoke(cli, ["slice-scores", str(tmp_path), "-o", str(tmp_path / "o"), "--model",
                                      str(DEMO_MODEL), "--denoiser", str(DEMO_MODEL)])
    assert result.exit_code == 2 and "one of --model DIR or --denoiser DIR, not both" in result.output
    assert not (tmp_path / "o").exists()


def test_statistics_and_mask_resampling():
    values = np.array([-0.2, 0.0, 0.1, 0.3])
    stats = residual_statistics(values, frac_threshold=0.05)
    assert stats["mean_pos"] == pytest.approx(0.1)
    assert stats["mean_abs"] == pytest.approx(0.15)
    assert stats["frac_pos"] == pytest.approx(0.5)
    assert np.isnan(residual_statistics(values[:0])["mean_pos"])
    mask = np.zeros((20, 20, 10), bool)
    mask[5:15, 5:15, 2:8] = True
    grid = mask_to_grid(mask, (10, 10, 20))
    assert grid.shape == (10, 10, 20)
    assert abs(grid.mean() - mask.mean()) < 0.05  # same field of view: the same share of the volume


def test_config_defaults_match_yaml():
    from covidctnet.core.config import load_config
    from tests.data_paths import REPO_ROOT

    assert load_config(SliceScoresConfig, REPO_ROOT / "configs" / "slice_scores.yaml") == SliceScoresConfig()
