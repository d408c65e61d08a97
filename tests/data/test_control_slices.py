"""Tests of covidctnet.data.control_slices on the real shared control series, preprocessed at 64x64."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_paths import CONTROL, SIZE, preprocessed_control

from covidctnet.core.errors import ConfigError, InputError, LabelError, ShapeError, SplitError
from covidctnet.data.control_slices import (
    ControlSliceDataset,
    load_slices,
    noise_transform_kwargs,
    noised_validation_set,
    select_control_studies,
    split_control_slices,
)
from covidctnet.training.trainer import EpochSampler


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return preprocessed_control(tmp_path_factory)


@pytest.fixture(scope="module")
def stacks(data_dir) -> dict[str, np.ndarray]:
    return load_slices(data_dir, [CONTROL])


def test_select_needs_labels_when_manifest_has_none(data_dir, tmp_path):
    with pytest.raises(LabelError, match="--labels"):
        select_control_studies(data_dir)
    assert select_control_studies(data_dir, studies=[CONTROL]) == [CONTROL]
    with pytest.raises(InputError, match="nope"):
        select_control_studies(data_dir, studies=[CONTROL, "nope"])
    labels = tmp_path / "labels.csv"
    labels.write_text(f"study_id,label\n{CONTROL},normal\nother,covid\n")
    assert select_control_studies(data_dir, labels=labels) == [CONTROL]
    labels.write_text(f"study_id,label\n{CONTROL},COVID-19\n")
    with pytest.raises(LabelError, match="no study labelled control"):
        select_control_studies(data_dir, labels=labels)
    with pytest.raises(InputError, match="manifest.csv"):
        select_control_studies(tmp_path)


def test_select_from_manifest_labels(data_dir, tmp_path):
    copy = tmp_path / "pp"
    shutil.copytree(data_dir, copy)
    manifest = copy / "manifest.csv"
    lines = manifest.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("label")] = "control"
    manifest.write_text("\n".join([lines[0], ",".join(row)]) + "\n")
    assert select_control_studies(copy) == [CONTROL]


def test_load_slices_are_the_axial_slices(data_dir, stacks):
    vol = nib.load(str(data_dir / f"{CONTROL}.nii.gz")).get_fdata(dtype=np.float32)
    stack = stacks[CONTROL]
    assert stack.shape == (vol.shape[2], SIZE, SIZE) and stack.dtype == np.float32
    assert vol.shape[2] == 64  # 32 slices of 2 mm -> 64 at 1 mm
    for k in (0, 31, vol.shape[2] - 1):
        np.testing.assert_array_equal(stack[k], vol[:, :, k])
    whole = stack.read(0, len(stack))
    assert 0.0 <= whole.min() and whole.max() <= 1.0 and whole.std() > 0.1
    # decoded once into <data>/cache and reused: a second open reads the same file, not the NIfTI again
    cached = data_dir / "cache" / f"{CONTROL}.npy"
    assert stack.path == cached and cached.is_file()
    mtime = cached.stat().st_mtime_ns
    assert load_slices(data_dir, [CONTROL])[CONTROL].path == cached and cached.stat().st_mtime_ns == mtime
    with pytest.raises(ShapeError, match="in-plane size"):
        load_slices(data_dir, [CONTROL], size_xy=32)


def test_load_slices_refuses_hu(data_dir, tmp_path):
    copy = tmp_path / "pp"
    shutil.copytree(data_dir, copy)
    img = nib.load(str(copy / f"{CONTROL}.nii.gz"))
    hu = img.get_fdata(dtype=np.float32) * 1400 - 1000
    nib.save(nib.Nifti1Image(hu, img.affine), str(copy / f"{CONTROL}.nii.gz"))
    with pytest.raises(InputError, match=r"expected a preprocessed volume in \[0, 1\]"):
        load_slices(copy, [CONTROL])


def test_split_one_study_holds_out_a_block_with_gap():
    split = split_control_slices({"a": 64}, val_fraction=0.2, seed=0, val_gap_slices=2)
    assert split.mode == "slices" and split.train_ids == split.val_ids == ("a",)
    train_k = [k for _, k in split.train]
    val_k = [k for _, k in split.val]
    assert val_k == list(range(51, 64))  # round(0.2 * 64) = 13 most superior slices
    assert max(train_k) == 51 - 2 - 1 and min(train_k) == 0
    assert not set(train_k) & set(val_k)
    sparse = split_control_slices({"a": 64}, slices_per_study=10)
    assert len(sparse.train) == 10 and sparse.train[0][1] == 0 and sparse.train[-1][1] == 48
    with pytest.raises(SplitError, match="too few"):
        split_control_slices({"a": 3}, val_fraction=0.5, val_gap_slices=2)
    with pytest.raises(ConfigError):
        split_control_slices({"a": 64}, val_fraction=0.0)


def test_split_several_studies_holds_out_studies():
    depths = {f"s{i}": 40 + i for i in range(10)}
    split = split_control_slices(depths, val_fraction=0.2, seed=3)
    assert split.mode == "studies" and len(split.val_ids) == 2 and len(split.train_ids) == 8
    assert not set(split.train_ids) & set(split.val_ids)
    assert {s for s, _ in split.train} == set(split.train_ids) and {s for s, _ in split.val} == set(split.val_ids)
    assert len(split.train) == sum(depths[s] for s in split.train_ids)
    assert split_control_slices(depths, 0.2, seed=3) == split
    others = {split_control_slices(depths, 0.2, seed=s).val_ids for s in range(6)}
    assert len(others) > 1  # the seed chooses the held-out studies
    two = split_control_slices({"a": 10, "b": 10}, val_fraction=0.9)
    assert len(two.train_ids) == 1 and len(two.val_ids) == 1  # at least one study stays for training


def test_noise_scale_follows_the_image_size():
    assert noise_transform_kwargs(128)["scale_range"] == (10, 30)
    assert noise_transform_kwargs(240)["scale_range"] == (19, 56)
    assert noise_transform_kwargs(64)["scale_range"] == (5, 15)
    assert noise_transform_kwargs(240, reference_size=None)["scale_range"] == (10, 30)


def test_batches_are_half_noised_with_clean_targets(stacks):
    split = split_control_slices({CONTROL: stacks[CONTROL].shape[0]})
    ds = ControlSliceDataset(stacks, split.train, seed=7, noise_kwargs=noise_transform_kwargs(SIZE))
    sampler = EpochSampler(len(ds), seed=7)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler, collate_fn=ds.collate)
    n_batches = 0
    for batch in loader:
        b = batch["image"].shape[0]
        assert batch["image"].shape == batch["target"].shape == (b, 1, SIZE, SIZE)
        n_noisy = int(b * 0.5)
        assert batch["noised"].tolist() == [True] * n_noisy + [False] * (b - n_noisy)
        diff = (batch["image"] - batch["target"]).flatten(1)
        assert (diff[:n_noisy].std(dim=1) > 0.05).all()  # Perlin noise of std ~0.2, added without clipping
        assert (diff[n_noisy:] == 0).all()
        n_batches += 1
    assert n_batches == -(-len(ds) // 5)
    # targets are the clean slices of the volume
    idx, clean = ds[3]
    sid, k = split.train[3]
    np.testing.assert_array_equal(clean[0].numpy(), stacks[sid][k])


def test_noise_is_a_function_of_seed_epoch_index(stacks):
    split = split_control_slices({CONTROL: stacks[CONTROL].shape[0]})
    kw = noise_transform_kwargs(SIZE)
    ds = ControlSliceDataset(stacks, split.train, seed=1, noise_kwargs=kw)
    ds.set_epoch(2)
    a = ds.collate([ds[4], ds[9]])["image"][0]
    b = ds.collate([ds[4], ds[0], ds[20], ds[1]])["image"][0]  # same item first, other batch
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = ControlSliceDataset(stacks, split.train, seed=1, noise_kwargs=kw)  # a fresh dataset (a resumed run)
    other.set_epoch(2)
    torch.testing.assert_close(other.collate([other[4], other[9]])["image"], ds.collate([ds[4], ds[9]])["image"],
                               rtol=0, atol=0)
    ds.set_epoch(3)
    assert not torch.equal(ds.collate([ds[4], ds[9]])["image"][0], a)
    ds2 = ControlSliceDataset(stacks, split.train, seed=2, noise_kwargs=kw)
    ds2.set_epoch(2)
    assert not torch.equal(ds2.collate([ds2[4], ds2[9]])["image"][0], a)


def test_validation_set_is_fixed_and_fully_noised(stacks):
    split = split_control_slices({CONTROL: stacks[CONTROL].shape[0]})
    kw = noise_transform_kwargs(SIZE)
    noisy, clean = noised_validation_set(stacks, split.val, seed=0, noise_kwargs=kw)
    assert noisy.shape == clean.shape == (len(split.val), 1, SIZE, SIZE)
    assert ((noisy - clean).flatten(1).std(dim=1) > 0.05).all()
    again, _ = noised_validation_set(stacks, split.val, seed=0, noise_kwargs=kw)
    assert torch.equal(noisy, again)
    np.testing.assert_array_equal(clean[0, 0].numpy(), stacks[CONTROL][split.val[0][1]])


def test_dataset_refuses_bad_arguments(stacks):
    with pytest.raises(SplitError):
        ControlSliceDataset(stacks, [])
    with pytest.raises(ConfigError):
        ControlSliceDataset(stacks, [(CONTROL, 0)], noise_fraction=1.5)
