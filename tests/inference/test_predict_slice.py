"""Tests of covidctnet.inference.predict_slice's Grad-CAM on real UCSD validation images with the bundled model.

Orientation: the map that predict-slice draws must correlate with MONAI's raw (un-normalised) Grad-CAM, and masking
the region it marks must lower p_covid more than masking random regions of the same size and shape. The second test
also runs the same check on the inverted map the old code drew, and expects it to fail there: the check can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import covidctnet.inference.predict_slice as ps
from covidctnet.data.ucsd import load_grey, ucsd_records
from covidctnet.inference.backends import open_model
from covidctnet.models.registry import DEFAULT_SLICE_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOP_FRACTION = 0.10  # the "top-CAM region": the 10% of input pixels with the highest map
N_RANDOM = 8  # random placements of that region per image
N_IMAGES = 6  # COVID-19 validation images the model calls COVID-19 with p >= 0.8, in split-list order


@pytest.fixture(scope="module")
def slice_model():
    return open_model(DEFAULT_SLICE_MODEL, "torch", "cpu").slice_model()


@pytest.fixture(scope="module")
def val_records(ucsd_root):
    return ucsd_records(ucsd_root, "val")


def _raw_monai_cam(model, x: torch.Tensor) -> np.ndarray:
    """MONAI's Grad-CAM of the COVID-19 output with its post-processing switched off (upsampled, not rescaled)."""
    from monai.visualize import GradCAM

    members = getattr(model, "members", None)
    layers = [f"members.{i}.layer4" for i in range(len(members))] if members is not None else ["layer4"]
    cam = GradCAM(nn_module=model, target_layers=layers, postprocessing=lambda m: m)
    with torch.enable_grad():
        return np.mean([cam(x, class_idx=1, layer_idx=i)[0, 0].detach().numpy() for i in range(len(layers))], axis=0)


def _p_covid(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.softmax(model(x).float(), dim=1)[0, 1])


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def test_saved_map_is_oriented_like_raw_grad_cam(slice_model, val_records, tmp_path, monkeypatch):
    model, config = slice_model
    covid = [r.path for r in val_records if r.label == 1][:2]
    noncovid = [r.path for r in val_records if r.label == 0][:1]
    drawn: dict[str, tuple[np.ndarray, float, float]] = {}
    original = ps._write_cam

    def spy(path, image, cam, p_covid, threshold, name):  # records exactly what goes into each PNG
        drawn[name] = (cam.copy(), p_covid, threshold)
        return original(path, image, cam, p_covid, threshold, name)

    monkeypatch.setattr(ps, "_write_cam", spy)
    # batch size 1: each image is scored after the previous one's Grad-CAM, which must leave the network as it was
    summary = ps.predict_slices([*covid, *noncovid], tmp_path / "out", cam_dir=tmp_path / "cams", device="cpu",
                                batch_size=1)
    assert summary.n_ok == 3 and len(summary.cams) == 3 and all(p.stat().st_size > 0 for p in summary.cams)
    for path in [*covid, *noncovid]:
        cam, p, threshold = drawn[path.name]
        saved = np.load(tmp_path / "cams" / f"{path.stem}_cam.npy")
        np.testing.assert_array_equal(saved, cam)  # the saved map is the one drawn
        x, _ = ps._network_input(config, load_grey(path))
        raw = _raw_monai_cam(model, x)
        corr = np.corrcoef(saved.ravel(), raw.ravel())[0, 1]
        assert corr > 0.95, (path.name, corr)
        assert threshold == pytest.approx(config["threshold"]) and p == pytest.approx(_p_covid(model, x), abs=1e-5)
        assert cam.min() >= 0.0
    # absolute scale, not min-max per image: maps keep their own maxima (not all 1), in log-odds units
    maxima = [float(drawn[p.name][0].max()) for p in [*covid, *noncovid]]
    assert len({round(m, 3) for m in maxima}) == 3 and all(0.2 < m < 20 for m in maxima), maxima


def test_monai_default_postprocessing_is_what_inverted_the_map(slice_model, val_records):
    """The bug of issue 18, kept as a fact about MONAI: its default output is the raw map turned upside down."""
    from monai.visualize import GradCAM

    model, config = slice_model
    path = [r.path for r in val_records if r.label == 1][0]
    x, _ = ps._network_input(config, load_grey(path))
    layers = [f"members.{i}.layer4" for i in range(len(model.members))]
    with torch.enable_grad():
        default = GradCAM(nn_module=model, target_layers=layers)(x, class_idx=1, layer_idx=0)[0, 0].detach().numpy()
    ours = ps.grad_cam_maps(model, config, [load_grey(path)])[0]
    assert np.corrcoef(default.ravel(), ours.ravel())[0, 1] < -0.5


def _masking_drops(model, config, path, rng) -> tuple[float, float, list[float]] | None:
    """Log-odds drop when masking the top-CAM region, the bottom-CAM region (the old inverted map's top) and
    ``N_RANDOM`` random placements of the top region (same shape and size, shifted with wrap-around)."""
    grey = load_grey(path)
    x, _ = ps._network_input(config, grey)
    p0 = _p_covid(model, x)
    if p0 < 0.8:
        return None
    cam = ps.grad_cam_maps(model, config, [grey])[0]
    top = cam >= np.quantile(cam, 1 - TOP_FRACTION)
    bottom = cam <= np.quantile(cam, TOP_FRACTION)

    def drop(region: np.ndarray) -> float:
        y = x.clone()
        y[0, 0][torch.from_numpy(region)] = 0.0  # 0 = the slice's mean after the per-image z-score
        return _logit(p0) - _logit(_p_covid(model, y))

    size = cam.shape[0]
    rand = [drop(np.roll(top, (int(rng.integers(size)), int(rng.integers(size))), axis=(0, 1)))
            for _ in range(N_RANDOM)]
    return drop(top), drop(bottom), rand


def test_masking_the_top_cam_region_lowers_p_covid_more_than_random_regions(slice_model, val_records):
    model, config = slice_model
    rng = np.random.default_rng(0)
    top, bottom, rand_mean = [], [], []
    for record in [r for r in val_records if r.label == 1]:
        result = _masking_drops(model, config, record.path, rng)
        if result is None:
            continue
        t, b, r = result
        top.append(t)
        bottom.append(b)
        rand_mean.append(float(np.mean(r)))
        if len(top) == N_IMAGES:
            break
    assert len(top) == N_IMAGES
    assert not model.training  # Grad-CAM left the network in eval mode
    top_a, bottom_a, rand_a = map(np.asarray, (top, bottom, rand_mean))
    print(f"log-odds drops over {N_IMAGES} images: top-CAM {top_a.mean():.3f}, random {rand_a.mean():.3f}, "
          f"inverted-map top {bottom_a.mean():.3f}; top beats random in {(top_a > rand_a).sum()}/{N_IMAGES}")
    # the fixed map: its region matters more than a random region of the same size, on average. (Not in most single
    # images with the cross-validated 128 px bundle of issue 16: its maps are diffuse; measured 2 of these 6, 8 of all
    # 17 val images with p >= 0.8, mean drops 0.81 top, 0.38 random, 0.00 inverted.)
    assert top_a.mean() > rand_a.mean() + 0.1
    # the same check on the old (inverted) map fails: what it marked matters less than a random region
    assert not bottom_a.mean() > rand_a.mean() + 0.1


def test_threshold_and_output_folder_checked_before_anything_runs(tmp_path):
    from covidctnet.core.errors import ConfigError, InputError

    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
            ps.predict_slices([tmp_path / "x.png"], tmp_path / "out", threshold=bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="existing file; the output must be a folder"):
        ps.predict_slices([tmp_path / "x.png"], tmp_path / "file")
    assert not (tmp_path / "out").exists()
