"""Shared fixtures. Real data comes from ``COVIDCTNET_TEST_DATA`` (default ``../shared/data`` from the repo root).

Outside CI a missing folder skips the tests that need it, with the reason; under ``CI=true`` it fails them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from data_paths import require_data

DICOM_SERIES = {"covid": "covid-P001", "cap": "cap-cap001", "control": "control-normal001"}


@pytest.fixture(scope="session")
def data_root() -> Path:
    return require_data()


@pytest.fixture(scope="session")
def dicom_dirs() -> dict[str, Path]:
    """The three real DICOM series: {'covid': ..., 'cap': ..., 'control': ...} (32 slices each, JPEG Lossless)."""
    return {label: require_data("ct-dicom", name) for label, name in DICOM_SERIES.items()}


@pytest.fixture(scope="session")
def nifti_ct() -> Path:
    """A small real CT NIfTI (Apache-2.0, TotalSegmentator test data): 122x101x30, 3 mm, RAS, int16."""
    return require_data("ct-nifti", "totalseg_example_ct_sm.nii.gz")


@pytest.fixture(scope="session")
def nifti_dir() -> Path:
    return require_data("ct-nifti")


@pytest.fixture(scope="session")
def ucsd_root() -> Path:
    """UCSD COVID-CT train + val images with the official split lists."""
    return require_data("covid-ct-2d")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Official CovidCTNet Keras CNN weights and the seeded-random BCDU-Net Keras reference."""
    return require_data("reference")


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("COVIDCTNET_NO_PROGRESS", "1")


@pytest.fixture(scope="session", autouse=True)
def _export_cache(tmp_path_factory):
    """``--backend auto`` (the default) exports each model to ONNX into ``$XDG_CACHE_HOME/covidctnet``: one cache for
    the whole session, so that each model is exported once and the user's ~/.cache is never written (subprocesses
    inherit the variable)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    On two cores shared with other jobs, two OpenMP threads wait on each other: a small conv step was seen taking
    5-20x longer than with one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mini_ucsd(ucsd_root, tmp_path_factory) -> Path:
    """A real-image copy of the UCSD layout, small enough for several training runs in a test: 8 + 8 training and
    6 + 6 validation images, shrunk to at most 96 px (same format and mode), with CRLF line endings for NonCOVID."""
    from PIL import Image

    from covidctnet.data.ucsd import read_split_list

    root = tmp_path_factory.mktemp("mini_ucsd")
    for cls, folder in (("COVID", "CT_COVID"), ("NonCOVID", "CT_NonCOVID")):
        (root / folder).mkdir()
        (root / "Data-split" / cls).mkdir(parents=True)
        sep = "\n" if cls == "COVID" else "\r\n"
        for split, n in (("train", 8), ("val", 6)):
            names = read_split_list(ucsd_root / "Data-split" / cls / f"{split}CT_{cls}.txt")[:n]
            for name in names:
                with Image.open(ucsd_root / folder / name) as im:
                    im.thumbnail((96, 96))
                    im.save(root / folder / name, format=im.format or ("JPEG" if name.endswith(".jpg") else "PNG"))
            (root / "Data-split" / cls / f"{split}CT_{cls}.txt").write_bytes(sep.join(names).encode())
    return root


@pytest.fixture(scope="session")
def residual_demo_model(tmp_path_factory) -> Path:
    """The bundled demo model as a residual-evidence directory (its classifier reading the denoiser's residual):
    what the tests of the denoiser's numerics (backends, int8, bf16) need, now that the bundled classifier reads the
    lesion model's maps. Its classifier was trained on lesion maps, so its probabilities mean nothing."""
    from covidctnet.core.model_dir import load_model_dir, save_model_dir
    from covidctnet.models.registry import DEMO_MODEL

    md = load_model_dir(DEMO_MODEL)
    keep = ("classifier", "denoiser")
    config = {**md.config, "evidence": "residual",
              "components": {c: {k: v for k, v in md.config["components"][c].items() if k != "weights"} for c in keep}}
    out = tmp_path_factory.mktemp("residual_demo") / "model"
    save_model_dir(out, config, {c: md.state_dict(c) for c in keep}, "# the demo model, residual evidence (tests)\n")
    return out
