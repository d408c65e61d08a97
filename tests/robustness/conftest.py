"""Fixtures of the robustness tests: one workspace of real inputs and models per test module."""

from __future__ import annotations

import pytest
from robust_cases import Sources, Workspace, workspace_at


@pytest.fixture(scope="module")
def sources(dicom_dirs, nifti_ct, ucsd_root) -> Sources:
    return Sources(dicom_dirs, nifti_ct, ucsd_root)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, sources) -> Workspace:
    return workspace_at(tmp_path_factory, sources)
