"""Where the tests find the shared real data: ``COVIDCTNET_TEST_DATA`` (default ``../shared/data`` from the repo
root). A plain module (not ``conftest``), so that helpers outside fixtures can import it unambiguously."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("COVIDCTNET_TEST_DATA")
    return Path(env).resolve() if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


def require_data(*parts: str) -> Path:
    """Path of a shared-data item; skips the test when absent (fails under CI=true)."""
    path = _data_root().joinpath(*parts)
    if not path.exists():
        msg = f"test data not found: {path} (set COVIDCTNET_TEST_DATA to the shared data folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


CONTROL = "control-normal001"
"""The control series used for denoiser and residual tests (32 slices of ``ct-dicom/``)."""
SIZE = 64


def preprocessed_control(tmp_path_factory: pytest.TempPathFactory, size: int = SIZE) -> Path:
    """The shared control DICOM series through ``preprocess_studies`` at ``size``, once per test session.

    Shared by the denoiser and residual tests through a folder in the session's base temp dir (a session fixture
    imported into several modules would run once per module).
    """
    from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_studies

    out = tmp_path_factory.getbasetemp() / f"preprocessed_control_{size}"
    if not (out / "preprocess.yaml").is_file():
        summary = preprocess_studies([require_data("ct-dicom", CONTROL)], out, PreprocessConfig(size_xy=size))
        assert summary.n_failed == 0, summary.errors
    return out
