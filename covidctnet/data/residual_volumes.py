"""Residual volumes with labels for the 3D classifier, and patient-level train / val / test splits.

The residual NIfTI written by ``covidctnet residuals`` is ``(X, Y, Z)`` in RAS+ (``size_xy × size_xy × depth``,
float32, signed: input − denoised). The network takes ``(C, D, H, W)``. The one conversion between the two is the
classifier's input contract, :func:`covidctnet.models.cnn3d.residual_to_network_input`, shared by training and
prediction (re-exported here, the name model directories written before it moved record).

Splits are patient-level: every study of one patient (``patient_id`` column of the labels CSV, else the study id) lands
in exactly one of train / val / test, either drawn from a seed (stratified by class where the class has enough
patients) or read from a split file (``study_id,split``). Anything else is refused with :class:`SplitError`.

Augmentation (training only) is MONAI's ``RandFlip`` along the left-right axis and a small ``RandAffine`` (rotation in
the axial plane, isotropic-ish scaling, translation; zero padding = "no residual"), re-seeded for every item from
``derive_seed(seed, epoch, index)``, so batches do not depend on workers, processes or resumption.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from covidctnet.core.errors import InputError, LabelError, NonFiniteError, ShapeError, SplitError, UnreadableFileError
from covidctnet.core.files import read_csv_dicts, write_csv
from covidctnet.core.labels import CLASS_NAMES, label_index, read_labels_csv
from covidctnet.core.seeding import derive_seed
from covidctnet.io.array_cache import cached_npy
from covidctnet.io.batch import read_manifest
from covidctnet.models.cnn3d import residual_to_network_input

__all__ = [
    "SPLITS",
    "ResidualRecord",
    "residual_to_network_input",
    "read_residual",
    "find_residuals",
    "read_patient_ids",
    "build_records",
    "build_augmentation",
    "ResidualVolumeDataset",
    "split_patients",
    "read_split_file",
    "check_split",
    "apply_split_file",
    "write_split_csv",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}


# --------------------------------------------------------------------------------------------------------------------
# one volume


def read_residual(path: str | os.PathLike, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read one residual NIfTI and check it.

    Args:
        path: ``<study_id>_residual.nii.gz``.
        expected_shape: (size_xy, size_xy, depth) the classifier is built for, or None to skip the check.

    Returns:
        (X, Y, Z) float32 array in RAS+.

    Raises:
        UnreadableFileError: missing or unreadable file.
        ShapeError: not 3-D, not RAS-oriented, or not ``expected_shape``.
        NonFiniteError: NaN or infinite voxels.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        array = np.asarray(img.get_fdata(dtype=np.float32))
    except FileNotFoundError as err:
        raise UnreadableFileError(f"{path}: residual volume not found") from err
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib errors … for damaged files
        raise UnreadableFileError(f"{path}: cannot read residual NIfTI: {str(err).splitlines()[0][:200]}") from err
    if array.ndim != 3:
        raise ShapeError(f"{path}: residual must be a 3-D (X, Y, Z) volume, not shape {array.shape}")
    axcodes = "".join(nib.aff2axcodes(img.affine))
    if axcodes != "RAS":
        raise ShapeError(f"{path}: residual orientation is {axcodes}, expected RAS as `covidctnet residuals` writes")
    if expected_shape is not None and tuple(array.shape) != tuple(int(s) for s in expected_shape):
        raise ShapeError(
            f"{path}: residual shape {tuple(array.shape)}, the classifier expects {tuple(expected_shape)} "
            "(size_xy, size_xy, depth); re-run `covidctnet residuals` with the same depth/size_xy or change the config"
        )
    if not np.isfinite(array).all():
        raise NonFiniteError(f"{path}: residual holds NaN or infinite voxels")
    return array


# --------------------------------------------------------------------------------------------------------------------
# which studies


@dataclass(frozen=True)
class ResidualRecord:
    """One labelled residual volume.

    Attributes:
        study_id: study id (from the residuals manifest).
        path: the residual NIfTI.
        label: class index (0 control, 1 covid, 2 cap).
        patient_id: patient the study belongs to (the study id unless the labels CSV says otherwise).
    """

    study_id: str
    path: Path
    label: int
    patient_id: str

    @property
    def label_name(self) -> str:
        return CLASS_NAMES[self.label]


def find_residuals(residuals_dir: str | os.PathLike) -> tuple[dict[str, Path], dict[str, str]]:
    """The ``ok`` residual volumes of a ``covidctnet residuals`` output folder.

    Returns:
        ``({study_id: path}, {study_id: manifest label})``; the second holds only non-empty manifest labels.

    Raises:
        InputError: no ``manifest.csv``, or no ``ok`` row in it.
        UnreadableFileError: an ``ok`` row whose file is missing.
    """
    residuals_dir = Path(residuals_dir)
    manifest = residuals_dir / "manifest.csv"
    rows = read_manifest(manifest)
    if not rows:
        raise InputError(f"{manifest}: missing or empty; RESIDUALS must be an output folder of `covidctnet residuals`")
    paths: dict[str, Path] = {}
    labels: dict[str, str] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        sid = row["study_id"]
        path = residuals_dir / (row.get("output") or f"{sid}_residual.nii.gz")
        if not path.is_file():
            raise UnreadableFileError(f"{manifest}: study {sid} is 'ok' but its file {path} is missing")
        paths[sid] = path
        if (row.get("label") or "").strip():
            labels[sid] = row["label"].strip()
    if not paths:
        raise InputError(f"{manifest}: no study has status 'ok'; nothing to train on")
    return paths, labels


def read_patient_ids(path: str | os.PathLike, id_column: str = "study_id") -> dict[str, str] | None:
    """``{study_id: patient_id}`` from the optional ``patient_id`` column of a labels CSV (None without the column).

    Raises:
        LabelError: an empty ``patient_id`` cell (row number given).
    """
    path = Path(path)
    rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    if not rows or "patient_id" not in rows[0]:
        return None
    if id_column not in rows[0] and "case_id" in rows[0]:
        id_column = "case_id"
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        pid = (row.get("patient_id") or "").strip()
        if not pid:
            raise LabelError(f"{path}: row {i}: empty patient_id (leave the column out to use the study id)")
        out[(row[id_column] or "").strip()] = pid
    return out


def build_records(
    residuals_dir: str | os.PathLike,
    labels: str | os.PathLike | None = None,
) -> list[ResidualRecord]:
    """Pair the ``ok`` residual volumes with their labels (and patient ids).

    Args:
        residuals_dir: output folder of ``covidctnet residuals``.
        labels: labels CSV (``study_id,label[,patient_id]``; names, aliases or indices, see
            :func:`covidctnet.core.labels.normalize_label`). None: use the ``label`` column of the residuals manifest.

    Returns:
        Records sorted by study id. Residuals without a label are skipped (logged).

    Raises:
        LabelError: bad labels CSV, or no residual has a label.
    """
    paths, manifest_labels = find_residuals(residuals_dir)
    if labels is not None:
        raw = read_labels_csv(labels)
        patients = read_patient_ids(labels) or {}
        source = str(labels)
    else:
        manifest = Path(residuals_dir) / "manifest.csv"
        raw = manifest_labels
        patients = {}
        source = str(manifest)
    unlabelled = sorted(set(paths) - set(raw))
    if unlabelled:
        logger.warning("%s: %d residual volume(s) have no label and are not used, e.g. %s", source, len(unlabelled),
                       unlabelled[:5])
    no_residual = sorted(set(raw) - set(paths))
    if no_residual:
        logger.warning("%s: %d labelled studies have no 'ok' residual in %s, e.g. %s", source, len(no_residual),
                       residuals_dir, no_residual[:5])
    records = [
        ResidualRecord(sid, paths[sid], label_index(raw[sid], f"{source}: study {sid}"), patients.get(sid, sid))
        for sid in sorted(set(paths) & set(raw))
    ]
    if not records:
        raise LabelError(f"{source}: none of the {len(paths)} residual volume(s) in {residuals_dir} has a label; "
                         "pass --labels labels.csv with study_id,label")
    return records


# --------------------------------------------------------------------------------------------------------------------
# augmentation and dataset


def build_augmentation(
    flip_prob: float = 0.5,
    affine_prob: float = 0.5,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate_frac: float = 0.05,
    size: Sequence[int] | None = None,
) -> Any:
    """MONAI 3D augmentation of a (1, D, H, W) network input (training only).

    Args:
        flip_prob: probability of a left-right flip (axis W). Only left-right: the lungs are roughly mirror
            images, whereas an upside-down or front-to-back chest never occurs.
        affine_prob: probability of the random affine.
        rotate_deg: largest rotation in the axial (H, W) plane, degrees either way.
        scale: largest relative zoom, ±``scale`` per axis.
        translate_frac: largest shift as a fraction of each axis (voxels = fraction × size); needs ``size``.
        size: (D, H, W) of the input, to turn ``translate_frac`` into voxels.

    Returns:
        a ``monai.transforms.Compose``; seed it with ``set_random_state`` before each call.
    """
    translate = None
    if translate_frac > 0 and size is not None:
        translate = tuple(float(translate_frac * s) for s in size)
    from monai.transforms import Compose, RandAffine, RandFlip  # training only: predict needs no MONAI

    return Compose([
        RandFlip(prob=flip_prob, spatial_axis=2),
        RandAffine(
            prob=affine_prob,
            # MONAI's first 3D angle rotates within spatial axes 1 and 2, i.e. (H, W): the axial plane
            rotate_range=(math.radians(rotate_deg), 0.0, 0.0),
            scale_range=(scale, scale, scale),
            translate_range=translate,
            padding_mode="zeros",  # a residual of 0 means "nothing left by the denoiser"
            mode="bilinear",
        ),
    ])


class ResidualVolumeDataset(Dataset):
    """Labelled residual volumes as network inputs.

    Items are ``{"image": (1, D, H, W) float32, "label": int64 scalar, "index": int64 scalar}``; D, H, W follow
    :func:`residual_to_network_input`. With a ``transform``, item ``i`` of epoch ``e`` is augmented with the random
    state ``derive_seed(seed, e, i)`` (the :class:`~covidctnet.training.trainer.Trainer` calls :meth:`set_epoch`).

    Args:
        records: the studies (see :func:`build_records`).
        depth, size_xy: the grid the classifier is built for; every file must be (size_xy, size_xy, depth).
        transform: augmentation of the (1, D, H, W) tensor, e.g. :func:`build_augmentation`; None for validation.
        seed: run seed.
        cache: decode each residual NIfTI once into an uncompressed ``.npy`` in ``<its folder>/cache/`` (the network
            layout, ``4 · depth · size_xy²`` bytes, 11.5 MB at the default 50×240×240) and read that afterwards,
            ten times faster than decompressing; False decodes the NIfTI at every read. Nothing is kept in memory
            either way, so memory does not grow with the number of studies (see :mod:`covidctnet.io.array_cache`).
    """

    def __init__(
        self,
        records: Sequence[ResidualRecord],
        depth: int,
        size_xy: int,
        transform: Any = None,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.records = list(records)
        self.depth = int(depth)
        self.size_xy = int(size_xy)
        self.transform = transform
        self.seed = int(seed)
        self.cache = cache
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class indices."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    def class_counts(self, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
        """(num_classes,) number of studies per class."""
        return np.bincount(self.labels, minlength=num_classes)

    def volume(self, index: int) -> torch.Tensor:
        """The unaugmented (1, D, H, W) input of item ``index``, read from disk."""
        rec = self.records[index]
        if not self.cache:
            return residual_to_network_input(self._decode(rec.path))
        path = cached_npy(rec.path, rec.path.parent / "cache", self._decode_network_input)
        return torch.from_numpy(np.load(path))[None]  # a plain read: no memory map whose pages would stay in RSS

    def _decode(self, path: Path) -> np.ndarray:
        return read_residual(path, (self.size_xy, self.size_xy, self.depth))

    def _decode_network_input(self, path: Path) -> np.ndarray:
        return residual_to_network_input(self._decode(path))[0].numpy()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = self.volume(index)
        if self.transform is not None:
            self.transform.set_random_state(seed=derive_seed(self.seed, self.epoch, index) % 2**32)
            x = self.transform(x)
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)  # MetaTensor → plain tensor
            x = x.to(torch.float32).contiguous()
        return {"image": x, "label": torch.tensor(self.records[index].label, dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64)}


# --------------------------------------------------------------------------------------------------------------------
# splits


def check_split(assignment: Mapping[str, str], patient_of: Mapping[str, str], source: str = "split") -> None:
    """Refuse a split in which one patient's studies are in two sets.

    Args:
        assignment: ``{study_id: "train" | "val" | "test"}``.
        patient_of: ``{study_id: patient_id}`` (studies missing here are their own patient).
        source: name for the message (the split file).

    Raises:
        SplitError: naming the first patient found in two sets, its studies and their sets.
    """
    seen: dict[str, tuple[str, str]] = {}
    for sid in sorted(assignment):
        pid = patient_of.get(sid, sid)
        split = assignment[sid]
        if pid in seen and seen[pid][1] != split:
            other, other_split = seen[pid]
            raise SplitError(
                f"{source}: patient {pid!r} is in two sets: study {other} in {other_split}, study {sid} in {split}; "
                "all studies of a patient must be in one set"
            )
        seen.setdefault(pid, (sid, split))


def split_patients(
    records: Sequence[ResidualRecord],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, str]:
    """A patient-level split drawn from ``seed``, stratified by class where possible.

    Patients are grouped by class (a patient's class is its most frequent study label), sorted and shuffled with
    ``numpy.random.default_rng(seed)``; from each class with at least two patients, ``round(fraction · n)`` patients
    (at least 1, leaving at least 1 for training) go to test, then to val. A class with a single patient stays in
    train. If that leaves val empty, one patient drawn at random goes to val (unstratified, logged).

    Args:
        records: the labelled studies.
        val_fraction, test_fraction: fractions of each class's patients, in [0, 1).
        seed: split seed; the same seed and records give the same split whatever their order.

    Returns:
        ``{study_id: "train" | "val" | "test"}``.

    Raises:
        SplitError: fractions out of range, or fewer than 2 patients when a validation set is asked for.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise SplitError(f"val_fraction and test_fraction must be in [0, 1) with sum < 1, not {val_fraction} and "
                         f"{test_fraction}")
    studies_of: dict[str, list[ResidualRecord]] = {}
    for rec in records:
        studies_of.setdefault(rec.patient_id, []).append(rec)
    if val_fraction > 0 and len(studies_of) < 2:
        raise SplitError(f"{len(studies_of)} patient(s) cannot be split into train and val; add data or pass "
                         "a split file")
    by_class: dict[int, list[str]] = {}
    for pid in sorted(studies_of):
        labels = [r.label for r in studies_of[pid]]
        by_class.setdefault(max(set(labels), key=lambda c: (labels.count(c), -c)), []).append(pid)
    rng = np.random.default_rng(seed)
    patient_split = {pid: "train" for pid in studies_of}
    for cls in sorted(by_class):
        pids = list(by_class[cls])
        rng.shuffle(pids)
        n = len(pids)
        taken = 0
        for split, frac in (("test", test_fraction), ("val", val_fraction)):
            if frac <= 0 or n < 2:
                continue
            k = min(max(1, round(frac * n)), n - 1 - taken)
            for pid in pids[taken : taken + k]:
                patient_split[pid] = split
            taken += max(k, 0)
    if val_fraction > 0 and "val" not in patient_split.values():
        train_pids = sorted(p for p, s in patient_split.items() if s == "train")
        if len(train_pids) < 2:
            raise SplitError(f"{len(studies_of)} patients leave no patient for validation; lower test_fraction or "
                             "pass a split file")
        pid = train_pids[int(rng.integers(len(train_pids)))]
        patient_split[pid] = "val"
        logger.warning("no class has 2 or more patients: validation patient %r drawn unstratified; validation "
                       "figures from one patient mean little", pid)
    assignment = {r.study_id: patient_split[r.patient_id] for r in records}
    check_split(assignment, {r.study_id: r.patient_id for r in records}, "seeded split")
    return assignment


def read_split_file(path: str | os.PathLike) -> dict[str, str]:
    """Read a split CSV (``study_id,split``; split ∈ train / val / test, ``validation`` accepted).

    Returns:
        ``{study_id: "train" | "val" | "test"}``.

    Raises:
        SplitError: unreadable file, missing columns, unknown split name, or a study listed twice with two splits.
    """
    path = Path(path)
    rows = read_csv_dicts(path, SplitError, "split file", "study_id,split")
    missing = [c for c in ("study_id", "split") if c not in rows[0]]
    if missing:
        raise SplitError(f"{path}: missing column(s) {missing}; found {sorted(c for c in rows[0] if c)}")
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        sid = (row["study_id"] or "").strip()
        raw = (row["split"] or "").strip().lower()
        if not sid:
            raise SplitError(f"{path}: row {i}: empty study_id")
        if raw not in _SPLIT_ALIASES:
            raise SplitError(f"{path}: row {i}: unknown split {row['split']!r}; expected one of {list(SPLITS)}")
        split = _SPLIT_ALIASES[raw]
        if sid in out and out[sid] != split:
            raise SplitError(f"{path}: row {i}: study {sid} is listed in {out[sid]} and in {split}")
        out[sid] = split
    return out


def apply_split_file(records: Sequence[ResidualRecord], path: str | os.PathLike) -> dict[str, str]:
    """Check a split file against the labelled residuals and return the split of the listed studies.

    Studies that have a residual and a label but are not listed are left out (logged).

    Returns:
        ``{study_id: split}`` for the listed studies.

    Raises:
        SplitError: a listed study has no usable (``ok``, labelled) residual, or a patient lands in two sets.
    """
    assignment = read_split_file(path)
    known = {r.study_id for r in records}
    missing = sorted(set(assignment) - known)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise SplitError(f"{path}: {len(missing)} listed stud{'y' if len(missing) == 1 else 'ies'} "
                         f"{', '.join(missing[:3])}{more} not among the labelled 'ok' residual volumes")
    left_out = sorted(known - set(assignment))
    if left_out:
        logger.warning("%s: %d labelled residual(s) not listed are not used, e.g. %s", path, len(left_out),
                       left_out[:5])
    check_split(assignment, {r.study_id: r.patient_id for r in records}, str(path))
    return assignment


def write_split_csv(path: str | os.PathLike, records: Sequence[ResidualRecord], assignment: Mapping[str, str]) -> None:
    """Write ``study_id,patient_id,label,split`` (sorted by split, then study id) atomically.

    The file is itself a valid split file for :func:`read_split_file`.
    """
    chosen = sorted((r for r in records if r.study_id in assignment),
                    key=lambda r: (SPLITS.index(assignment[r.study_id]), r.study_id))
    write_csv(path, ["study_id", "patient_id", "label", "split"],
              ([rec.study_id, rec.patient_id, rec.label_name, assignment[rec.study_id]] for rec in chosen))
