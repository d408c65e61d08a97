"""Tests of covidctnet.data.ucsd (UCSD and folder-per-class layouts, grey-scale reading) and
covidctnet.preprocessing.lungmask2d."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidctnet.core.errors import LabelError, SplitError, UnreadableFileError
from covidctnet.data.ucsd import (
    SliceDataset,
    build_slice_transforms,
    find_records,
    folder_records,
    load_grey,
    read_split_list,
    ucsd_records,
)
from covidctnet.preprocessing.lungmask2d import lung_mask


def _listed(root: Path, cls: str, split: str) -> list[str]:
    return read_split_list(root / "Data-split" / cls / f"{split}CT_{cls}.txt")


def test_split_list_crlf_without_final_newline(ucsd_root, tmp_path):
    raw = (ucsd_root / "Data-split" / "NonCOVID" / "trainCT_NonCOVID.txt").read_bytes()
    assert b"\r\n" in raw and not raw.endswith(b"\n")  # the shared file really has the awkward form
    names = read_split_list(ucsd_root / "Data-split" / "NonCOVID" / "trainCT_NonCOVID.txt")
    assert len(names) == 234 and all("\r" not in n and n == n.strip() for n in names)
    crafted = tmp_path / "list.txt"
    crafted.write_bytes(b"a.png\r\nb.png\r\n\r\nc.png")
    assert read_split_list(crafted) == ["a.png", "b.png", "c.png"]
    crafted.write_bytes(b"a.png\nb.png\na.png\n")
    with pytest.raises(SplitError, match="listed twice"):
        read_split_list(crafted)


@pytest.mark.parametrize("split, n_covid, n_non", [("train", 191, 234), ("val", 60, 58)])
def test_ucsd_split_and_labels(ucsd_root, split, n_covid, n_non):
    records = ucsd_records(ucsd_root, split)
    covid = [r for r in records if r.label == 1]
    non = [r for r in records if r.label == 0]
    assert (len(covid), len(non)) == (n_covid, n_non)
    assert all(r.path.parent.name == "CT_COVID" for r in covid)  # COVID is the positive class
    assert all(r.path.parent.name == "CT_NonCOVID" for r in non)
    assert {r.path.name for r in covid} == set(_listed(ucsd_root, "COVID", split))
    assert {r.path.name for r in non} == set(_listed(ucsd_root, "NonCOVID", split))
    assert all(r.split == split for r in records)


def test_ucsd_train_and_val_disjoint(ucsd_root):
    train = {r.path for r in find_records(ucsd_root, "train")}
    val = {r.path for r in find_records(ucsd_root, "val")}
    assert train and val and not train & val


def _mini_ucsd(ucsd_root: Path, tmp_path: Path) -> Path:
    """A 4+4 image copy of the UCSD layout with LF lists (COVID) and CRLF lists (NonCOVID)."""
    root = tmp_path / "ucsd"
    for cls, folder in (("COVID", "CT_COVID"), ("NonCOVID", "CT_NonCOVID")):
        (root / folder).mkdir(parents=True)
        (root / "Data-split" / cls).mkdir(parents=True)
        names = _listed(ucsd_root, cls, "train")[:4]
        for name in names:
            shutil.copyfile(ucsd_root / folder / name, root / folder / name)
        sep = "\n" if cls == "COVID" else "\r\n"
        (root / "Data-split" / cls / f"trainCT_{cls}.txt").write_bytes(sep.join(names[:3]).encode())
        (root / "Data-split" / cls / f"valCT_{cls}.txt").write_bytes(names[3].encode())
    return root


def test_ucsd_errors(ucsd_root, tmp_path):
    root = _mini_ucsd(ucsd_root, tmp_path)
    assert len(ucsd_records(root, "train")) == 6 and len(ucsd_records(root, "val")) == 2
    with pytest.raises(SplitError, match="no test split"):
        ucsd_records(root, "test")
    victim = read_split_list(root / "Data-split" / "NonCOVID" / "trainCT_NonCOVID.txt")[1]
    (root / "CT_NonCOVID" / victim).unlink()
    with pytest.raises(SplitError, match=f"lists CT_NonCOVID/{victim}, which is missing"):
        ucsd_records(root, "val")  # every split is checked, whichever is asked for
    shutil.copyfile(ucsd_root / "CT_NonCOVID" / victim, root / "CT_NonCOVID" / victim)
    covid_train = read_split_list(root / "Data-split" / "COVID" / "trainCT_COVID.txt")
    (root / "Data-split" / "COVID" / "testCT_COVID.txt").write_text(covid_train[0] + "\n")
    with pytest.raises(SplitError, match="also listed in the train split"):
        ucsd_records(root, "train")


def test_folder_layout(ucsd_root, tmp_path):
    src = ucsd_records(ucsd_root, "val")
    covid = [r.path for r in src if r.label == 1][:3]
    non = [r.path for r in src if r.label == 0][:2]
    for split, files_c, files_n in (("train", covid[:2], non[:1]), ("val", covid[2:], non[1:])):
        for name, files in (("COVID-19", files_c), ("normal", files_n)):
            (tmp_path / split / name).mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, tmp_path / split / name / f.name)
    train = find_records(tmp_path, "train")
    assert sorted(r.label for r in train) == [0, 1, 1]
    assert all((r.label == 1) == (r.path.parent.name == "COVID-19") for r in train)
    flat = folder_records(tmp_path / "val")
    assert sorted(r.label for r in flat) == [0, 1]
    shutil.copyfile(covid[0], tmp_path / "val" / "COVID-19" / covid[0].name)
    with pytest.raises(SplitError, match="in both the train and val splits"):
        find_records(tmp_path, "train")
    (tmp_path / "other" / "martian").mkdir(parents=True)
    with pytest.raises(LabelError, match="martian"):
        folder_records(tmp_path / "other")
    with pytest.raises(SplitError, match="no test folder"):
        find_records(tmp_path, "test")


# ---------------------------------------------------------------------------------------------------------------------
# grey-scale reading


def _first_of_mode(ucsd_root: Path, fmt: str, mode: str) -> Path:
    for folder in ("CT_COVID", "CT_NonCOVID"):
        for p in sorted((ucsd_root / folder).iterdir()):
            with Image.open(p) as im:
                if im.format == fmt and im.mode == mode:
                    return p
    pytest.fail(f"no {fmt} {mode} image in the shared data")


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGBA"), ("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB"), ("JPEG", "L")])
def test_real_modes_read_as_grey(ucsd_root, fmt, mode):
    path = _first_of_mode(ucsd_root, fmt, mode)
    grey = load_grey(path)
    with Image.open(path) as im:
        assert grey.shape == (im.height, im.width)
    assert grey.dtype == np.float32 and 0.0 <= grey.min() and grey.max() <= 1.0 and grey.std() > 0.05


def test_synthetic_modes_agree(ucsd_root, tmp_path):
    """Every mode of the same picture gives the same grey image (up to palette quantisation)."""
    base = (load_grey(_first_of_mode(ucsd_root, "PNG", "L")) * 255).round().astype(np.uint8)
    ref = base.astype(np.float32) / 255
    variants = {
        "L": Image.fromarray(base, "L"),
        "RGB": Image.fromarray(np.stack([base] * 3, -1), "RGB"),
        "RGBA": Image.fromarray(np.dstack([base] * 3 + [np.full_like(base, 255)]), "RGBA"),
        "LA": Image.fromarray(np.dstack([base, np.full_like(base, 255)]), "LA"),
        "I;16": Image.fromarray(base.astype(np.uint16) * 257),
        "P": Image.fromarray(np.stack([base] * 3, -1), "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
        "F": Image.fromarray(base.astype(np.float32) * 3.0 - 100.0, "F"),
    }
    for mode, im in variants.items():
        suffix = ".tiff" if mode == "F" else ".png"
        path = tmp_path / f"img_{mode.replace(';', '_')}{suffix}"
        im.save(path)
        with Image.open(path) as check:
            assert check.mode.startswith(mode[0]), (mode, check.mode)
        grey = load_grey(path)
        tol = 0.02 if mode == "P" else 1e-3
        assert np.abs(grey - ref).mean() < tol, mode
    # transparent pixels are background (black), whatever colour they hold
    rgba = np.dstack([np.full_like(base, 200)] * 3 + [np.zeros_like(base)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert load_grey(tmp_path / "clear.png").max() == 0.0


def test_unreadable_images(tmp_path, ucsd_root):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UnreadableFileError, match="notes.png: cannot read image"):
        load_grey(tmp_path / "notes.png")
    data = _first_of_mode(ucsd_root, "PNG", "RGB").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(UnreadableFileError, match="cut.png"):
        load_grey(tmp_path / "cut.png")
    with pytest.raises(UnreadableFileError, match="not found"):
        load_grey(tmp_path / "absent.png")


# ---------------------------------------------------------------------------------------------------------------------
# dataset, augmentation, lung mask


def test_dataset_seeded_augmentation(ucsd_root):
    records = ucsd_records(ucsd_root, "val")[:6]
    ds = SliceDataset(records, 64, lung_mask=True, transform=build_slice_transforms(True, 64, True), seed=5)
    a = ds[2]
    assert a["image"].shape == (2, 64, 64) and a["image"].dtype == torch.float32
    assert int(a["label"]) == records[2].label
    assert set(a["image"][1].unique().tolist()) <= {0.0, 1.0}  # the mask channel stays binary after augmentation
    assert torch.equal(a["image"], ds[2]["image"])  # a function of (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(a["image"], ds[2]["image"])
    plain = SliceDataset(records, 64, cache=ds.cache, lung_mask=True)
    x = plain[2]["image"][0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 0.02  # per-image z-score
    assert ds.class_balance_weights()[0] == pytest.approx(1 / sum(r.label == records[0].label for r in records))


def test_lung_mask_on_real_slices(ucsd_root):
    records = ucsd_records(ucsd_root, "val")
    fractions = []
    for r in records[::10]:
        img = load_grey(r.path)
        m = lung_mask(img)
        assert m.shape == img.shape and m.dtype == bool
        fractions.append(m.mean())
    fractions = np.array(fractions)
    # most slices get a lung-sized mask (a few percent to about half the picture); none covers everything
    assert (fractions > 0.03).mean() >= 0.7 and fractions.max() < 0.7
    assert not lung_mask(np.zeros((64, 64))).any()
