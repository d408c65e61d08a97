"""UCSD COVID-CT slices (and any folder-per-class layout of slice images) for the 2D branch.

Layouts read:

* **UCSD** (``UCSD-AI4H/COVID-CT``)::

      ROOT/CT_COVID/*.png|jpg           ROOT/Data-split/COVID/{train,val,test}CT_COVID.txt
      ROOT/CT_NonCOVID/*.png|jpg        ROOT/Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt

  The split lists are one file name per line; the NonCOVID lists have Windows line endings and no final newline.
  A split whose list is absent (the test split here) is simply unavailable. Every listed file must exist, and no
  file may be listed in two splits (:class:`~covidctnet.core.errors.SplitError` otherwise).
* **Folder per class**: ``ROOT/<class>/*`` for one set, or ``ROOT/<split>/<class>/*`` with ``split`` in
  ``train``/``val``/``test``. Class folders are read with the label aliases (``covid``, ``CT_COVID``, ``COVID-19``,
  ``noncovid``, ``CT_NonCOVID``, ``normal``, ``control``, ``cap`` …; every non-COVID class is negative).

COVID-19 is the positive class, label 1, everywhere (``noncovid`` = 0).

Images are read as grey-scale whatever their mode (L, RGB, RGBA, palette, LA, 1-bit, 16-bit, 32-bit int or float)
into float32 in [0, 1] (:func:`load_grey`). :class:`SliceDataset` caches every image once, resized to the model's
square input, with an optional classical lung mask as a second channel, and applies MONAI augmentation drawn from
a generator seeded by ``(seed, epoch, index)``, so the batches of an epoch do not depend on worker count or on
whether the run was resumed.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import (
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureTyped,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandFlipd,
    RandRotated,
    RandScaleCropd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ToTensord,
)
from PIL import Image, ImageDraw, UnidentifiedImageError
from skimage.transform import resize

from covidctnet.core.errors import LabelError, SplitError, UnreadableFileError
from covidctnet.core.labels import normalize_any_label
from covidctnet.core.seeding import derive_seed
from covidctnet.preprocessing.lungmask2d import lung_mask

__all__ = [
    "IMAGE_SUFFIXES",
    "SliceRecord",
    "read_split_list",
    "ucsd_records",
    "folder_records",
    "find_records",
    "load_grey",
    "resize_square",
    "prepare_slice",
    "build_slice_transforms",
    "source_augment",
    "SliceDataset",
    "label_of_folder",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
SPLITS = ("train", "val", "test")
UCSD_CLASSES = {"COVID": ("CT_COVID", 1), "NonCOVID": ("CT_NonCOVID", 0)}  # split-folder name -> (image folder, label)


@dataclass(frozen=True)
class SliceRecord:
    """One image: its path, label (1 = COVID, 0 = non-COVID, -1 = unknown) and split name."""

    path: Path
    label: int
    split: str = ""


# --------------------------------------------------------------------------------------------------------------------
# layouts


def read_split_list(path: str | os.PathLike) -> list[str]:
    """File names of one split list; CRLF or LF endings, a missing final newline and blank lines are all fine.

    Raises:
        SplitError: unreadable file, or a name listed twice.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise SplitError(f"{path}: cannot read split list: {err}") from err
    names = [line.strip() for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SplitError(f"{path}: {name!r} is listed twice")
        seen.add(name)
    return names


def _is_ucsd(root: Path) -> bool:
    return (root / "Data-split").is_dir() and (root / "CT_COVID").is_dir()


def ucsd_records(root: str | os.PathLike, split: str) -> list[SliceRecord]:
    """Records of one split of the UCSD layout, after checking every available split list.

    Args:
        root: the dataset folder (``CT_COVID/``, ``CT_NonCOVID/``, ``Data-split/``).
        split: ``train``, ``val`` or ``test``.

    Raises:
        SplitError: the split's lists are absent, a listed file is missing, or a file is listed in two splits.
    """
    root = Path(root)
    if split not in SPLITS:
        raise SplitError(f"{root}: unknown split {split!r}; expected one of {list(SPLITS)}")
    where: dict[tuple[str, str], str] = {}  # (class folder, file name) -> split that lists it
    records: dict[str, list[SliceRecord]] = {s: [] for s in SPLITS}
    found_any = {s: False for s in SPLITS}
    for cls, (folder, label) in UCSD_CLASSES.items():
        for s in SPLITS:
            list_path = root / "Data-split" / cls / f"{s}CT_{cls}.txt"
            if not list_path.is_file():
                continue
            found_any[s] = True
            for name in read_split_list(list_path):
                key = (folder, name)
                if key in where:
                    raise SplitError(f"{list_path}: {folder}/{name} is also listed in the {where[key]} split")
                where[key] = s
                image = root / folder / name
                if not image.is_file():
                    raise SplitError(f"{list_path}: lists {folder}/{name}, which is missing from {root / folder}")
                records[s].append(SliceRecord(image, label, s))
    if not found_any[split]:
        available = [s for s in SPLITS if found_any[s]]
        raise SplitError(f"{root / 'Data-split'}: no {split} split lists (*/{split}CT_*.txt); available: {available}")
    return records[split]


def label_of_folder(name: str) -> int:
    """1 for a COVID-19 class folder name, 0 for any other known class (non-COVID, normal, control, CAP).

    Raises:
        LabelError: the folder name is no known class.
    """
    return int(normalize_any_label(name, f"class folder {name!r}") == "covid")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_records(root: str | os.PathLike, split: str | None = None) -> list[SliceRecord]:
    """Records of a folder-per-class layout: ``root/<class>/*`` or, with ``split``, ``root/<split>/<class>/*``.

    Raises:
        SplitError: the split folder is missing or holds no class folder, or a file name appears in the same class
            of two splits (file contents are not compared).
        LabelError: a class folder has an unknown name.
    """
    root = Path(root)
    base = root / split if split else root
    if not base.is_dir():
        raise SplitError(f"{root}: no {split} folder; expected {root}/<split>/<class>/ with split in {list(SPLITS)}")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SplitError(f"{base}: no class folders (expected e.g. covid/ and noncovid/)")
    labels = {d: label_of_folder(d.name) for d in class_dirs}  # an unknown class name fails even if empty
    records = [SliceRecord(img, labels[d], split or "") for d in class_dirs for img in _images_in(d)]
    if split:  # the same file in two split folders of one class would leak
        for other in SPLITS:
            if other == split or not (root / other).is_dir():
                continue
            mine = {(r.label, r.path.name) for r in records}
            for d in sorted(p for p in (root / other).iterdir() if p.is_dir()):
                try:
                    lab = label_of_folder(d.name)
                except LabelError:
                    continue
                for img in _images_in(d):
                    if (lab, img.name) in mine:
                        raise SplitError(f"{root}: {img.name} ({d.name}) is in both the {split} and {other} splits")
    return records


def find_records(root: str | os.PathLike, split: str) -> list[SliceRecord]:
    """Records of ``split`` in either layout (UCSD if ``root/Data-split`` exists, else folder per class)."""
    root = Path(root)
    if not root.is_dir():
        raise SplitError(f"{root}: dataset folder not found")
    if _is_ucsd(root):
        return ucsd_records(root, split)
    return folder_records(root, split)


# --------------------------------------------------------------------------------------------------------------------
# reading and preparing images


def load_grey(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as grey-scale float32 in [0, 1].

    Colour images use the ITU-R 601 luma; an alpha channel is composited over black (transparent = background);
    palette images go through their palette; 16-bit images are divided by 65535; 32-bit integer and float images
    are min-max scaled (their range is not standard).

    Returns:
        (H, W) float32.

    Raises:
        UnreadableFileError: missing, empty, truncated or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            if mode in ("RGBA", "LA", "PA"):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
                rgb, alpha = rgba[..., :3], rgba[..., 3:]
                grey = (rgb * alpha) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                grey = np.asarray(im, dtype=np.float32) / 65535.0
            elif mode in ("I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                grey = ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)
            elif mode == "L":
                grey = np.asarray(im, dtype=np.float32) / 255.0
            else:  # RGB, 1, CMYK, YCbCr, HSV, ...
                grey = np.asarray(im.convert("RGB"), dtype=np.float32) @ np.array([0.299, 0.587, 0.114],
                                                                                  dtype=np.float32) / 255.0
    except FileNotFoundError as err:
        raise UnreadableFileError(f"{path}: file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableFileError(f"{path}: cannot read image ({type(err).__name__}: {str(err)[:160]})") from err
    if grey.ndim != 2 or min(grey.shape) < 8:
        raise UnreadableFileError(f"{path}: image of shape {grey.shape} is not a 2D slice of at least 8x8 pixels")
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W) to (size, size) with anti-aliasing (the aspect ratio is not kept, as in the reference code)."""
    if image.shape == (size, size):
        return image.astype(np.float32)
    return resize(image, (size, size), order=1, anti_aliasing=image.shape[0] > size or image.shape[1] > size,
                  preserve_range=True).astype(np.float32)


def prepare_slice(image: np.ndarray, size: int, with_lung_mask: bool) -> np.ndarray:
    """(H, W) grey image → (C, size, size) float32 array: the resized image, plus the lung mask when asked.

    Intensities stay in [0, 1] here; the transforms normalise them (:func:`build_slice_transforms`).
    """
    img = resize_square(image, size)
    if not with_lung_mask:
        return img[None]
    return np.stack([img, lung_mask(img).astype(np.float32)])


def build_slice_transforms(
    train: bool,
    size: int,
    lung_mask: bool = False,
    crop_scale: float = 0.6,
    rotate_degrees: float = 10.0,
    flip: bool = True,
    intensity: float = 0.1,
) -> Any:
    """The MONAI dict transform chain for ``{"image": (1, S, S), ["mask": (1, S, S)]}`` → ``{"image": (C, S, S)}``.

    Training adds a random resized crop (each side 0.6-1.0 of the image by default, so the aspect ratio jitters
    too), a left-right flip, a small rotation and intensity jitter (scale, shift, gamma), the same spatial draw for
    image and mask. Both paths end with a per-image z-score of the image (the published figures have arbitrary
    windows) and, with ``lung_mask``, the mask as the second channel.
    """
    keys = ["image", "mask"] if lung_mask else ["image"]
    modes = ["bilinear", "nearest"] if lung_mask else ["bilinear"]
    # tensors from the start, so that every key has the same type whichever random branches fire (ConcatItemsd needs it)
    steps: list[Any] = [EnsureTyped(keys, data_type="tensor", track_meta=False)]
    if train:
        steps += [
            RandScaleCropd(keys, roi_scale=crop_scale, max_roi_scale=1.0, random_size=True),
            Resized(keys, spatial_size=(size, size), mode=modes),
        ]
        if flip:
            steps.append(RandFlipd(keys, prob=0.5, spatial_axis=1))
        if rotate_degrees > 0:
            steps.append(RandRotated(keys, range_x=math.radians(rotate_degrees), prob=0.5, mode=modes,
                                     padding_mode="zeros", keep_size=True))
        if intensity > 0:
            steps += [
                RandScaleIntensityd("image", factors=intensity, prob=0.5),
                RandShiftIntensityd("image", offsets=intensity, prob=0.5),
                RandAdjustContrastd("image", gamma=(1 - 2 * intensity, 1 + 2.5 * intensity), prob=0.5),
            ]
    steps += [NormalizeIntensityd("image"), ToTensord(keys, track_meta=False)]  # plain tensors for ConcatItemsd
    if lung_mask:
        steps += [ConcatItemsd(["image", "mask"], "image"), DeleteItemsd("mask")]
    # log_stats stays off: it logs every transform of every item at INFO, which floods a training log
    return Compose(steps)


def source_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mimic how a CT slice ends up as a paper figure: another display window, a border, a crop, JPEG and labels.

    The UCSD images are figure panels from many papers, and images of one paper resemble each other more than new
    ones (``docs/implementation-notes.md``), so this changes what differs between sources rather than the anatomy. Each step fires with
    probability 0.5, in this order:

    * window / gamma: ``((x - lo) / (hi - lo)) ** gamma`` clipped to [0, 1], lo in [0, 0.2], hi in [0.8, 1],
      gamma in [0.6, 1.6] (figures shown in lung or softer windows, scanned or gamma-corrected);
    * border and aspect: the slice squeezed to 70-100 % of one or both sides and placed at random on a black (or,
      one time in four, white) canvas of the original size (panels with margins, non-square crops);
    * JPEG compression at quality 15-70 (figures saved and re-saved as JPEG);
    * overlays: 1-3 arrows and 0-2 short text marks (letters, digits) in white or black (annotations, panel
      letters).

    Args:
        image: (H, W) float32 in [0, 1].
        rng: the per-item generator (seeded from ``(seed, epoch, index)`` by :class:`SliceDataset`).

    Returns:
        (H, W) float32 in [0, 1].
    """
    h, w = image.shape
    out = np.clip(image.astype(np.float32), 0.0, 1.0)
    if rng.random() < 0.5:
        lo, hi, gamma = rng.uniform(0.0, 0.2), rng.uniform(0.8, 1.0), rng.uniform(0.6, 1.6)
        out = np.clip((out - lo) / (hi - lo), 0.0, 1.0) ** gamma
    if rng.random() < 0.5:
        sh, sw = max(8, round(h * rng.uniform(0.7, 1.0))), max(8, round(w * rng.uniform(0.7, 1.0)))
        canvas = np.full((h, w), 1.0 if rng.random() < 0.25 else 0.0, dtype=np.float32)
        top, left = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
        canvas[top:top + sh, left:left + sw] = _resize_to(out, (sh, sw))
        out = canvas
    pil = Image.fromarray(np.round(out * 255).astype(np.uint8), mode="L")
    if rng.random() < 0.5:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(rng.integers(15, 71)))
        buf.seek(0)
        pil = Image.open(buf).convert("L")
    if rng.random() < 0.5:
        draw = ImageDraw.Draw(pil)
        side = min(h, w)
        for _ in range(int(rng.integers(1, 4))):
            colour = 255 if rng.random() < 0.7 else 0
            x0, y0 = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.06, 0.15) * side
            x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
            width = max(1, round(side / 100))
            draw.line([(x1, y1), (x0, y0)], fill=colour, width=width)
            head = length * 0.35  # the head points at (x0, y0), the tip of the arrow
            for turn in (0.5, -0.5):
                draw.line([(x0, y0), (x0 + head * math.cos(angle + turn), y0 + head * math.sin(angle + turn))],
                          fill=colour, width=width)
        for _ in range(int(rng.integers(0, 3))):
            text = "".join(rng.choice(list("ABCDEFGHLRabcd0123456789"), size=int(rng.integers(1, 4))))
            draw.text((rng.uniform(0, 0.85) * w, rng.uniform(0, 0.9) * h), text, fill=255 if rng.random() < 0.7
                      else 0)
    return np.asarray(pil, dtype=np.float32) / 255.0


def _resize_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize (H, W) to ``shape`` (bilinear, anti-aliased when shrinking)."""
    return resize(image, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


class SliceDataset:
    """Slice images with labels, cached in memory at the model's input size, with seeded MONAI augmentation.

    Args:
        records: the images (:func:`find_records`).
        size: square input size in pixels.
        lung_mask: add the classical lung mask as a second channel.
        transform: the chain from :func:`build_slice_transforms` (``None``: z-score only).
        seed: augmentation seed; item ``i`` of epoch ``e`` draws from ``(seed, e, i)``.
        cache: prepared arrays to reuse (e.g. shared by a training and an evaluation view of the same records).
        source_aug: apply :func:`source_augment` to the image channel before ``transform`` (training only; the
            lung-mask channel, computed from the clean image, is left as it is).

    ``dataset[i]`` is ``{"image": (C, size, size) float32 tensor, "label": int64 tensor, "index": i}``.
    """

    def __init__(
        self,
        records: Sequence[SliceRecord],
        size: int,
        lung_mask: bool = False,
        transform: Any = None,
        seed: int = 0,
        cache: list[np.ndarray] | None = None,
        source_aug: bool = False,
    ) -> None:
        self.records = list(records)
        self.source_aug = source_aug
        self.size = size
        self.lung_mask = lung_mask
        self.transform = transform or build_slice_transforms(False, size, lung_mask)
        self.seed = seed
        self.epoch = 0
        self.cache = cache if cache is not None else [
            prepare_slice(load_grey(r.path), size, lung_mask) for r in self.records
        ]

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def class_balance_weights(self) -> list[float]:
        """Per-sample weights ``1 / count(class)``, so that each class is drawn equally often."""
        labels = self.labels
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        return [1.0 / counts[y] for y in labels]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arr = self.cache[index]
        item = {"image": arr[:1]}
        if self.source_aug:
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, index, 1))
            item["image"] = source_augment(arr[0], rng)[None]
        if self.lung_mask:
            item["mask"] = arr[1:2]
        self.transform.set_random_state(seed=derive_seed(self.seed, self.epoch, index) % 2**32)
        out = self.transform(item)
        return {"image": out["image"].float(), "label": torch.tensor(self.records[index].label), "index": index}


Split = Literal["train", "val", "test"]
