"""`covidctnet preprocess --scheduler` on a local Dask cluster gives the same bytes as running inline."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from covidctnet.batch import read_manifest
from covidctnet.cli import cli

distributed = pytest.importorskip("dask.distributed")


def test_dask_scheduler_matches_inline(dicom_dirs, nifti_ct, tmp_path):
    inputs = [str(dicom_dirs["cap"]), str(nifti_ct)]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(nifti_ct.read_bytes()[:20000])
    runner = CliRunner()
    inline = runner.invoke(cli, ["preprocess", *inputs, str(bad), "-o", str(tmp_path / "inline"), "--size", "64"])
    assert inline.exit_code == 1, inline.output
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = runner.invoke(cli, ["preprocess", *inputs, str(bad), "-o", str(tmp_path / "dask"), "--size", "64",
                                     "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 1, result.output  # the bad study fails there too, the others succeed
    for f in (tmp_path / "inline").glob("*.nii.gz"):
        assert (tmp_path / "dask" / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "dask" / "manifest.csv").read_text() == (tmp_path / "inline" / "manifest.csv").read_text()
    assert {r["study_id"]: r["status"] for r in read_manifest(tmp_path / "dask" / "manifest.csv")} == {
        "cap-cap001": "ok", "totalseg_example_ct_sm": "ok", "bad": "error"}


def test_unreachable_scheduler_is_one_line(nifti_ct, tmp_path):
    result = CliRunner().invoke(cli, ["preprocess", str(nifti_ct), "-o", str(tmp_path / "o"),
                                      "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "cannot reach the Dask scheduler" in result.output and "Traceback" not in result.output
