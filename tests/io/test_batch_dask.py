"""``--scheduler`` on a local Dask cluster (2 worker processes) gives the outputs of an inline run: ``preprocess``
(same bytes), ``residuals`` and ``predict`` (same numbers), with a bad study failing alone."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from model_factories import SIZE, tiny_denoiser_dir, tiny_predict_model

from covidctnet.cli import cli
from covidctnet.io.batch import read_manifest

distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture()
def bad_scan(nifti_ct, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(nifti_ct.read_bytes()[:20000])
    return bad


def _run_both(args: list[str], out_flag_dir, cluster: str) -> None:
    runner = CliRunner()
    for name, extra in (("inline", []), ("dask", ["--scheduler", cluster])):
        result = runner.invoke(cli, [*args, "-o", str(out_flag_dir / name), *extra])
        assert result.exit_code == 1, result.output  # the bad study fails, the others succeed


def test_preprocess_on_dask_matches_inline(cluster, dicom_dirs, nifti_ct, bad_scan, tmp_path):
    _run_both(["preprocess", str(dicom_dirs["cap"]), str(nifti_ct), str(bad_scan), "--size", "64"], tmp_path, cluster)
    for f in (tmp_path / "inline").glob("*.nii.gz"):
        assert (tmp_path / "dask" / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "dask" / "manifest.csv").read_text() == (tmp_path / "inline" / "manifest.csv").read_text()
    assert {r["study_id"]: r["status"] for r in read_manifest(tmp_path / "dask" / "manifest.csv")} == {
        "cap-cap001": "ok", "totalseg_example_ct_sm": "ok", "bad": "error"}


def test_residuals_on_dask_match_inline(cluster, dicom_dirs, nifti_ct, tmp_path):
    pre = tmp_path / "pre"
    assert CliRunner().invoke(cli, ["preprocess", str(dicom_dirs["cap"]), str(nifti_ct), "--size", str(SIZE),
                                    "-o", str(pre)]).exit_code == 0
    (pre / "broken.nii.gz").write_bytes(b"not a nifti")
    lines = (pre / "manifest.csv").read_text().splitlines()
    (pre / "manifest.csv").write_text("\n".join([*lines, lines[-1].replace("totalseg_example_ct_sm", "broken")]) + "\n")
    den = tiny_denoiser_dir(tmp_path / "den")
    _run_both(["residuals", str(pre), "--denoiser", str(den), "--depth", "20", "--device", "cpu"], tmp_path, cluster)
    for study in ("cap-cap001", "totalseg_example_ct_sm"):
        a, b = (nib.load(tmp_path / d / f"{study}_residual.nii.gz").get_fdata() for d in ("inline", "dask"))
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert {r["study_id"]: r["status"] for r in read_manifest(tmp_path / "dask" / "manifest.csv")}["broken"] == "error"


def test_predict_on_dask_and_in_a_process_pool_match_inline(cluster, dicom_dirs, bad_scan, tmp_path):
    model = tiny_predict_model(tmp_path / "model")
    args = ["predict", str(dicom_dirs["covid"]), str(dicom_dirs["control"]), str(bad_scan), "--model", str(model),
            "--device", "cpu"]
    _run_both(args, tmp_path, cluster)
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "pool"), "--workers", "2"])
    assert result.exit_code == 1, result.output
    reports = {d: {r["study_id"]: r for r in json.loads((tmp_path / d / "report.json").read_text())["studies"]}
               for d in ("inline", "dask", "pool")}
    for d in ("dask", "pool"):
        assert reports[d]["bad"]["status"] == "error" and "bad.nii.gz" in reports[d]["bad"]["error"]
        for study in ("covid-P001", "control-normal001"):
            for c in ("p_control", "p_covid", "p_cap"):
                assert reports[d][study][c] == pytest.approx(reports["inline"][study][c], abs=1e-5)


def test_unreachable_scheduler_is_one_line(nifti_ct, tmp_path):
    result = CliRunner().invoke(cli, ["preprocess", str(nifti_ct), "-o", str(tmp_path / "o"),
                                      "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "cannot reach the Dask scheduler" in result.output and "Traceback" not in result.output
