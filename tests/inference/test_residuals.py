"""Tests of covidctnet.inference.residuals and ``covidctnet residuals`` on the real control series (64x64) with a
denoiser
trained by ``train_denoiser`` (tiny, a few steps: the point is shapes, geometry, manifest and resume)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from data_paths import CONTROL, SIZE, preprocessed_control

from covidctnet.cli import cli
from covidctnet.core.errors import ConfigError, InputError, ModelDirError, ShapeError
from covidctnet.inference.residuals import (
    ResidualGrid,
    compute_residual,
    read_residual_grid,
    resample_stack,
)
from covidctnet.models.registry import load_denoiser
from covidctnet.preprocessing.preprocess import resize_affine
from covidctnet.training.denoiser import DenoiserConfig, train_denoiser

REPO_ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return preprocessed_control(tmp_path_factory)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("denoiser") / "run"
    cfg = DenoiserConfig(features=4, epochs=1, steps_per_epoch=2, batch_size=4, device="cpu", sample_png=False)
    train_denoiser(data_dir, run, cfg, studies=[CONTROL])
    return run


@pytest.fixture(scope="module")
def volume(data_dir) -> nib.Nifti1Image:
    return nib.load(str(data_dir / f"{CONTROL}.nii.gz"))


def _corners_and_centre(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates of the 8 outer corners of the voxel grid (voxel edges) and of its centre."""
    edges = [(-0.5, n - 0.5) for n in shape[:3]]
    pts = [(i, j, k) for i in edges[0] for j in edges[1] for k in edges[2]]
    pts.append(tuple((n - 1) / 2 for n in shape[:3]))
    hom = np.c_[np.array(pts), np.ones(len(pts))]
    return (affine @ hom.T).T[:, :3]


def test_grid_yaml_matches_dataclass(tmp_path):
    assert read_residual_grid(REPO_ROOT / "configs" / "residuals.yaml") == ResidualGrid() == ResidualGrid(50, 240)
    extra = tmp_path / "grid.yaml"
    extra.write_text("depth: 32\nsize_xy: 128\n")
    assert read_residual_grid(extra) == ResidualGrid(32, 128)
    assert read_residual_grid(extra, depth=10) == ResidualGrid(10, 128)
    extra.write_text("depth: zero\n")
    with pytest.raises(ConfigError, match="depth"):
        read_residual_grid(extra)
    # a classifier YAML is not a residuals config: its training keys are named, not silently ignored
    extra.write_text("depth: 32\nlr: 0.0001\n")
    with pytest.raises(ConfigError, match="lr"):
        read_residual_grid(extra)


def test_compute_residual_is_input_minus_denoised(run_dir, volume):
    den = load_denoiser(run_dir, "cpu")
    x = volume.get_fdata(dtype=np.float32)
    native = compute_residual(x, den, depth=x.shape[2], size=SIZE, batch_size=7)
    assert native.shape == x.shape and native.dtype == np.float32
    with torch.no_grad():
        slices = torch.from_numpy(np.moveaxis(x, 2, 0).copy())[:, None]
        expected = (slices - den.model(slices))[:, 0].numpy()
    np.testing.assert_allclose(np.moveaxis(native, 2, 0), expected, atol=1e-5)
    assert native.min() < 0 < native.max()  # signed
    # batch size does not change the result (eval mode: batch norm uses running statistics)
    np.testing.assert_allclose(compute_residual(x, den, x.shape[2], SIZE, batch_size=64), native, atol=1e-5)
    resized = compute_residual(x, den, depth=20, size=32, batch_size=16)
    assert resized.shape == (32, 32, 20) and resized.dtype == np.float32
    assert resized.min() < 0 < resized.max()
    np.testing.assert_allclose(resized, resample_stack(native, (32, 32, 20)), atol=1e-6)
    assert not den.model.training


def test_bf16_residual_is_close_to_fp32_and_leaves_the_model_as_it_was(run_dir, volume):
    den = load_denoiser(run_dir, "cpu")
    x = volume.get_fdata(dtype=np.float32)
    exact = compute_residual(x, den, depth=x.shape[2], size=SIZE)
    fast = compute_residual(x, den, depth=x.shape[2], size=SIZE, precision="bf16")
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    diff = np.abs(fast - exact)
    # bfloat16 keeps 8 bits of mantissa: a few 1e-3 on [0, 1] values, not equal (else bf16 was not used)
    assert 0 < diff.max() < 0.02 and diff.mean() < 2e-3, (diff.max(), diff.mean())
    assert next(den.model.parameters()).is_contiguous()  # the channels-last weights were put back
    np.testing.assert_array_equal(compute_residual(x, den, depth=x.shape[2], size=SIZE), exact)
    with pytest.raises(ConfigError, match="precision"):
        compute_residual(x, den, precision="fp16")


def test_compute_residual_refuses_bad_volumes(run_dir, volume):
    den = load_denoiser(run_dir, "cpu")
    x = volume.get_fdata(dtype=np.float32)
    with pytest.raises(ShapeError, match="expects 64x64"):
        compute_residual(x[:32, :32], den)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        compute_residual(x * 1400 - 1000, den)
    with pytest.raises(ShapeError, match="3-D"):
        compute_residual(x[:, :, 0], den)


def test_affine_keeps_the_field_of_view(volume):
    aff = volume.affine
    shape = volume.shape
    out_shape = (240, 240, 50)
    new = resize_affine(aff, shape, out_shape)
    np.testing.assert_allclose(_corners_and_centre(new, out_shape), _corners_and_centre(aff, shape), atol=1e-6)
    # voxel size scales with the zoom: 64 -> 240 in-plane, Z slices -> 50
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0),
                               np.linalg.norm(aff[:3, :3], axis=0) * np.array(shape) / np.array(out_shape))


def test_resampled_values_sit_at_their_world_position(volume):
    """A volume equal to world x + 2 y + 3 z (mm), resampled, still equals that function at its own voxel centres
    under the new affine (interior voxels: the edges see the reflect padding)."""
    aff, shape = volume.affine, volume.shape
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    ramp = (world @ np.array([1.0, 2.0, 3.0])).reshape(shape).astype(np.float32)
    out_shape = (48, 48, 50)
    out = resample_stack(ramp, out_shape)
    new = resize_affine(aff, shape, out_shape)
    ijk2 = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), axis=-1)
    world2 = ijk2 @ new[:3, :3].T + new[:3, 3]
    expected = world2 @ np.array([1.0, 2.0, 3.0])
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-2 * np.abs(expected).max())


def _copy_with_extra_studies(data_dir: Path, dst: Path) -> Path:
    """The preprocessed folder plus a second good study and a corrupted one, both listed ok in the manifest."""
    shutil.copytree(data_dir, dst)
    shutil.copyfile(dst / f"{CONTROL}.nii.gz", dst / "control-copy.nii.gz")
    good = (dst / f"{CONTROL}.nii.gz").read_bytes()
    (dst / "broken.nii.gz").write_bytes(good[: len(good) // 3])
    rows = list(csv.DictReader((dst / "manifest.csv").open()))
    for sid in ("control-copy", "broken"):
        rows.append({**rows[0], "study_id": sid, "source": sid, "output": f"{sid}.nii.gz"})
    with (dst / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return dst


def test_cli_batch_overlay_errors_and_resume(run_dir, data_dir, volume, tmp_path):
    pre = _copy_with_extra_studies(data_dir, tmp_path / "pre")
    out = tmp_path / "res"
    common = ["residuals", str(pre), "-o", str(out), "--denoiser", str(run_dir), "--device", "cpu", "--depth", "40",
              "--batch-size", "16"]
    args = [*common, "--size", "48"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output  # some studies failed
    assert "broken.nii.gz" in res.output and "Traceback" not in res.output
    rows = {r["study_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert {k: r["status"] for k, r in rows.items()} == {CONTROL: "ok", "control-copy": "ok", "broken": "error"}
    assert "broken.nii.gz" in rows["broken"]["error"] and not (out / "broken_residual.nii.gz").exists()
    img = nib.load(str(out / f"{CONTROL}_residual.nii.gz"))
    data = img.get_fdata(dtype=np.float32)
    assert img.shape == (48, 48, 40) and img.get_data_dtype() == np.float32
    assert data.min() < 0 < data.max() and rows[CONTROL]["output_shape"] == "48x48x40"
    # overlay: same field of view as the preprocessed scan, in world coordinates
    np.testing.assert_allclose(_corners_and_centre(img.affine, img.shape),
                               _corners_and_centre(volume.affine, volume.shape), atol=1e-4)
    # the same numbers compute_residual gives in memory
    den = load_denoiser(run_dir, "cpu")
    np.testing.assert_allclose(data, compute_residual(volume.get_fdata(dtype=np.float32), den, 40, 48), atol=1e-6)
    assert rows[CONTROL]["denoiser_sha256"] == den.weights_sha256
    info = yaml.safe_load((out / "residuals.yaml").read_text())
    assert info["depth"] == 40 and info["size_xy"] == 48 and info["denoiser_sha256"] == den.weights_sha256
    # resume: the done studies are skipped (files untouched), the broken one is tried again
    stamp = (out / f"{CONTROL}_residual.nii.gz").stat().st_mtime_ns
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "2 already done" in res.output
    assert (out / f"{CONTROL}_residual.nii.gz").stat().st_mtime_ns == stamp
    # another grid into the same folder is refused unless --no-resume
    res = CliRunner().invoke(cli, [*common, "--size", "32"])
    assert res.exit_code == 2 and "size_xy" in res.output
    res = CliRunner().invoke(cli, [*common, "--size", "32", "--no-resume"])
    assert res.exit_code == 1 and nib.load(str(out / f"{CONTROL}_residual.nii.gz")).shape == (32, 32, 40)
    # so is another precision: bf16 residuals differ a little from fp32 ones
    res = CliRunner().invoke(cli, [*common, "--size", "32", "--precision", "bf16"])
    assert res.exit_code == 2 and "precision" in res.output


def test_cli_refuses_mismatch_and_bad_paths(run_dir, data_dir, tmp_path):
    pre = tmp_path / "pre"
    shutil.copytree(data_dir, pre)
    settings = yaml.safe_load((pre / "preprocess.yaml").read_text())
    (pre / "preprocess.yaml").write_text(yaml.safe_dump({**settings, "size_xy": 128}))
    base = ["residuals", str(pre), "--denoiser", str(run_dir), "--device", "cpu"]
    res = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "expects 64" in res.output and not (tmp_path / "o").exists()
    (pre / "preprocess.yaml").write_text(yaml.safe_dump({**settings, "out_of_window": "air"}))
    res = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "out_of_window" in res.output
    res = CliRunner().invoke(cli, [*base, "-o", str(pre)])
    assert res.exit_code == 2 and "must differ" in res.output
    res = CliRunner().invoke(cli, ["residuals", str(data_dir), "-o", str(tmp_path / "o"), "--denoiser",
                                   str(tmp_path)])
    assert res.exit_code == 2 and "not a model directory" in res.output
    with pytest.raises(ModelDirError):
        load_denoiser(tmp_path)
