"""Preprocessing: HU volume → 1 mm, RAS, HU window mapped to [0, 1], fixed in-plane size.

Two profiles share one output contract (a float32 NIfTI in [0, 1], RAS orientation, 1 mm between slices, ``size_xy``
voxels in-plane, with the affine that overlays it on the original scan):

``default`` — reorientation to RAS (flips and axis swaps only) → linear resampling to 1 mm between slices and
``size_xy`` in-plane → [-1000, 400] HU → [0, 1], clipped. The resampling is one separable linear interpolation by
default (``resampler: interpolate``, :func:`linear_resize`, NumPy only: a whole run then imports no torch or MONAI),
or MONAI's Spacing(1×1×1 mm) + in-plane Resize (``resampler: spacing``, see :func:`build_transforms`).

``official`` — what the official CovidCTNet code does, for use with its published weights: cubic-spline resampling to
1 mm (``scipy.ndimage.zoom``, order 3, mode 'nearest') of the (slice, row, column) stack, HU outside [-1000, 400]
*set to* -1000 (so bone becomes air), (x + 1000) / 1400, and an anti-aliased linear resize of each slice to 128×128
(``skimage.transform.resize``). The result is stored in the same RAS layout as ``default`` (a pure flip/transpose,
no extra interpolation); :func:`ras_to_official_layout` recovers the official (slice, row, column) array.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from covidctnet.core.config import save_config, validate_config
from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.io.batch import discover_studies, run_batch
from covidctnet.io.checks import CheckLimits, check_volume
from covidctnet.io.volume import Volume, read_volume, write_nifti

if TYPE_CHECKING:
    from covidctnet.core.model_dir import ModelDir
    from covidctnet.io.batch import BatchSummary

__all__ = [
    "to_ras",
    "PreprocessConfig",
    "build_transforms",
    "preprocess_volume",
    "preprocess_official",
    "ras_to_official_layout",
    "official_layout_to_ras",
    "preprocess_study",
    "preprocess_studies",
    "PREPROCESS_COLUMNS",
    "OFFICIAL_PROFILE",
    "linear_resize",
    "resize_affine",
    "recorded_preprocess",
    "preprocess_record",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of ``covidctnet preprocess`` (defaults = ``configs/preprocess.yaml``).

    Attributes:
        profile: ``default`` (linear resampling) or ``official`` (the official CovidCTNet numerics).
        spacing_mm: target voxel size (x, y, z) in mm before the in-plane resize.
        hu_min, hu_max: HU window mapped to [0, 1].
        out_of_window: ``clip`` values to the window, or set them to ``air`` (hu_min) as the official code does.
        size_xy: in-plane output size (voxels); the official model used 128.
        interpolation: resampling to ``spacing_mm``: ``linear`` or ``cubic`` (official: cubic spline).
        resampler: ``interpolate`` (one separable pass, fast) or ``spacing`` (MONAI Spacing + Resize); see
            :func:`build_transforms`. Only ``spacing`` uses the in-plane ``spacing_mm``, as an intermediate grid.
        min_slices, max_gap_ratio, min_spacing_mm, max_spacing_mm, max_tilt_deg: input-check limits (see
            covidctnet.io.checks).
    """
    profile: Literal["default", "official"] = "default"
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_min: float = -1000.0
    hu_max: float = 400.0
    out_of_window: Literal["clip", "air"] = "clip"
    size_xy: int = 240
    interpolation: Literal["linear", "cubic"] = "linear"
    resampler: Literal["interpolate", "spacing"] = "interpolate"
    min_slices: int = 16
    max_gap_ratio: float = 1.5
    min_spacing_mm: float = 0.1
    max_spacing_mm: float = 12.0
    max_tilt_deg: float = 2.0

    def __post_init__(self) -> None:
        if self.hu_max <= self.hu_min:
            raise ConfigError(f"'hu_max' must be greater than 'hu_min', not {self.hu_max} <= {self.hu_min}")
        if not 8 <= self.size_xy <= 1024:
            raise ConfigError(f"'size_xy' must be in [8, 1024], not {self.size_xy}")
        if any(s <= 0 for s in self.spacing_mm):
            raise ConfigError(f"'spacing_mm' must be positive, not {list(self.spacing_mm)}")
        if self.min_slices < 1:
            raise ConfigError(f"'min_slices' must be at least 1, not {self.min_slices}")
        if self.profile == "default" and self.resampler == "interpolate" and self.interpolation == "cubic":
            raise ConfigError("'interpolation: cubic' needs 'resampler: spacing' (interpolate is linear only)")
        if self.max_gap_ratio <= 1:
            raise ConfigError(f"'max_gap_ratio' must be greater than 1, not {self.max_gap_ratio}")

    @property
    def limits(self) -> CheckLimits:
        return CheckLimits(
            min_slices=self.min_slices,
            max_gap_ratio=self.max_gap_ratio,
            min_spacing_mm=self.min_spacing_mm,
            max_spacing_mm=self.max_spacing_mm,
            max_tilt_deg=self.max_tilt_deg,
        )


def recorded_preprocess(md: ModelDir) -> PreprocessConfig:
    """The preprocessing a model directory's ``config.yaml`` records (``preprocess``), validated.

    Raises:
        ModelDirError: an unknown key or an invalid value (the message names the file).
    """
    return preprocess_record(md.config.get("preprocess") or {}, md.path)


def preprocess_record(settings: Mapping[str, Any], model_dir: str | os.PathLike) -> PreprocessConfig:
    """The ``preprocess`` block of ``model_dir``'s ``config.yaml`` as it was read (e.g. kept by a loaded network),
    validated.

    Raises:
        ModelDirError: an unknown key or an invalid value (the message names the file).
    """
    try:
        return validate_config(PreprocessConfig, settings, f"{model_dir}/config.yaml: preprocess")
    except ConfigError as err:
        raise ModelDirError(str(err)) from err


OFFICIAL_PROFILE: dict[str, Any] = {
    "profile": "official",
    "out_of_window": "air",
    "size_xy": 128,
    "interpolation": "cubic",
}
"""Settings that ``--profile official`` changes (``configs/preprocess_official.yaml`` holds the full config)."""


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D linear interpolation on voxel-centre aligned grids (two taps per row)."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(weights, (np.arange(n_out), lo), 1.0 - (src - lo))  # add.at: lo == hi at the clamped edge
    np.add.at(weights, (np.arange(n_out), hi), src - lo)
    return weights.astype(np.float32)


def linear_resize(array: np.ndarray, shape: Sequence[int], chunk: int = 16) -> np.ndarray:
    """Linear resampling of a 3-D array to ``shape``, one axis at a time, on voxel-centre (half-voxel) aligned grids.

    The same mapping as ``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)`` and MONAI's
    ``Resize`` (output voxel ``i`` samples input position ``(i + 0.5) · n_in / n_out − 0.5``, clamped to the edge
    voxels); trilinear interpolation is separable, so three 1-D passes give the same values. Done in NumPy so that
    preprocessing needs neither torch nor MONAI (their import cost: ``docs/implementation-notes.md``).

    Each pass is a matrix product with a two-tap weight matrix (BLAS), taken in the array's memory order: the two
    inner (contiguous) axes of ``chunk`` outer planes at a time, then the outer axis on the reduced array, so no
    full-size temporary is made (why not a gather along a transposed view: ``docs/implementation-notes.md``).

    Args:
        array: (X, Y, Z), any real dtype and memory layout (a transposed view of a DICOM stack is not copied).
        shape: output (X', Y', Z').
        chunk: outer planes resampled at once (bounds the temporary memory).

    Returns:
        (X', Y', Z') float32, in the memory order of ``array`` (F-contiguous for a transposed C-contiguous stack).
    """
    # axes from outermost (largest stride) to innermost: the order in which the data lie in memory
    order = sorted(range(3), key=lambda a: -abs(array.strides[a]))
    base = array.transpose(order)
    outer, mid, inner = (int(shape[a]) for a in order)
    w_outer, w_mid, w_inner = (
        None if n_in == n_out else _linear_weights(n_in, n_out) for n_in, n_out in zip(base.shape, (outer, mid, inner))
    )
    plane = np.empty((base.shape[0], mid, inner), dtype=np.float32)
    for start in range(0, base.shape[0], chunk):
        block = np.asarray(base[start : start + chunk], dtype=np.float32)
        if w_inner is not None:
            block = (block.reshape(-1, block.shape[2]) @ w_inner.T).reshape(*block.shape[:2], inner)
        plane[start : start + chunk] = block if w_mid is None else np.matmul(w_mid, block)
    if w_outer is not None:
        plane = (w_outer @ plane.reshape(base.shape[0], -1)).reshape(outer, mid, inner)
    return plane.transpose(np.argsort(order))


def resize_affine(affine: np.ndarray, shape_in: Sequence[int], shape_out: Sequence[int]) -> np.ndarray:
    """Affine of a volume resized from ``shape_in`` to ``shape_out`` over the same field of view.

    With the ``align_corners=False`` convention (:func:`linear_resize`, ``skimage.transform.resize``), output voxel
    ``o`` sits at input index ``(o + 0.5) * s - 0.5`` with ``s = n_in / n_out`` per axis, so voxel edges ``-0.5``
    and ``n - 0.5`` of both grids coincide.

    Args:
        affine: (4, 4) voxel → world (mm) of the input.
        shape_in, shape_out: the first three dimensions are used.

    Returns:
        (4, 4) float64 affine of the output grid.
    """
    scale = np.array(shape_in[:3], dtype=np.float64) / np.array(shape_out[:3], dtype=np.float64)
    vox = np.diag([*scale, 1.0])
    vox[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(affine, dtype=np.float64) @ vox


def _window(array: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """HU window → [0, 1], clipped (MONAI ``ScaleIntensityRange`` with ``clip=True``)."""
    array = (array - np.float32(cfg.hu_min)) / np.float32(cfg.hu_max - cfg.hu_min)
    return np.clip(array, 0.0, 1.0, out=array)


def build_transforms(cfg: PreprocessConfig) -> Any:
    """The MONAI chain of ``resampler: spacing``, applied to a (I, J, K) HU ``MetaTensor`` with its affine.

    EnsureChannelFirst → Orientation(RAS) → [out-of-window HU set to air, if configured] → ``Spacing(spacing_mm)``
    then in-plane ``Resize``, fused by MONAI's lazy resampling into one ``grid_sample`` → ScaleIntensityRange(HU
    window → [0, 1], clipped). Slower than the default ``interpolate`` resampler; kept as the literal MONAI chain.

    Returns:
        A ``monai.transforms.Compose`` mapping HU to a (1, size_xy, size_xy, Z) float32 MetaTensor in [0, 1].
    """
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        Orientation,
        Resize,
        ScaleIntensityRange,
        Spacing,
        ThresholdIntensity,
    )

    steps: list[Any] = [
        EnsureChannelFirst(channel_dim="no_channel"),
        Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if cfg.out_of_window == "air":
        # Official behaviour: out-of-window HU become air, not the window's edge (before resampling, as there).
        steps += [
            ThresholdIntensity(threshold=cfg.hu_max, above=False, cval=cfg.hu_min),
            ThresholdIntensity(threshold=cfg.hu_min, above=True, cval=cfg.hu_min),
        ]
    steps += [
        Spacing(
            pixdim=cfg.spacing_mm,
            mode="bilinear" if cfg.interpolation == "linear" else 3,
            padding_mode="border",
            dtype=np.float32,
        ),
        Resize(spatial_size=(cfg.size_xy, cfg.size_xy, -1), mode="bilinear", anti_aliasing=False),
        ScaleIntensityRange(a_min=cfg.hu_min, a_max=cfg.hu_max, b_min=0.0, b_max=1.0, clip=True),
    ]
    # No log_stats: MONAI would attach its own stdout handler at INFO and print every step; the batch runner records
    # a failing study's error in the manifest instead. lazy=True lets MONAI fuse Spacing and Resize into one pass.
    return Compose(steps, lazy=True)


def preprocess_volume(volume: Volume, cfg: PreprocessConfig = PreprocessConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess one HU volume.

    Args:
        volume: the CT in HU (see :func:`covidctnet.io.volume.read_volume`); checked beforehand by ``check_volume``.
        cfg: the preprocessing settings.

    Returns:
        ``(array, affine)``: (size_xy, size_xy, Z) float32 in [0, 1], RAS, 1 mm between slices; and its RAS+ affine.
    """
    if cfg.profile == "official":
        return preprocess_official(volume, cfg)
    if cfg.resampler == "spacing":
        return _preprocess_monai(volume, cfg)
    ras, affine = to_ras(volume, contiguous=False)  # read only: linear_resize makes new arrays
    ras = ras.astype(np.float32, copy=False)
    if cfg.out_of_window == "air":  # official behaviour: out-of-window HU become air, before resampling as there
        ras = np.where((ras > cfg.hu_max) | (ras < cfg.hu_min), np.float32(cfg.hu_min), ras)
    # 1 mm between slices up to the rounding of the scan length to whole slices (exact for 0.5/1/2/2.5/5 mm series)
    dz = float(np.linalg.norm(affine[:3, 2]))
    shape = (cfg.size_xy, cfg.size_xy, max(1, int(round(ras.shape[2] * dz / cfg.spacing_mm[2]))))
    # The window comes last: it then runs on the small resampled grid, not the full scan. Clipping after linear
    # interpolation differs from clipping before only at edges next to out-of-window tissue (bone).
    return _window(linear_resize(ras, shape), cfg), resize_affine(affine, ras.shape, shape)


def _preprocess_monai(volume: Volume, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from monai.data import MetaTensor

    img = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)),
        affine=torch.as_tensor(volume.affine, dtype=torch.float64),
    )
    out = build_transforms(cfg)(img)
    array = out[0].numpy().astype(np.float32, copy=False)
    affine = np.asarray(out.affine, dtype=np.float64)
    return np.clip(array, 0.0, 1.0), affine


def to_ras(volume: Volume, contiguous: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an array to RAS by flips and axis swaps only (exact), returning the array and its new affine.

    Args:
        volume: the volume.
        contiguous: return a C-contiguous copy; ``False`` may return a flipped / transposed view of ``volume.array``
            (no copy: for callers that only read it, such as the resampling).
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, ras)
    array = nib.orientations.apply_orientation(volume.array, transform)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.array.shape)
    return (np.ascontiguousarray(array) if contiguous else array), affine


def ras_to_official_layout(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z) RAS array → the official (slice, row, column) stack: slices inferior→superior, rows anterior→
    posterior, columns right→left, as pydicom stacks an axial head-first-supine series."""
    return np.ascontiguousarray(array[::-1, ::-1, :].transpose(2, 1, 0))


def official_layout_to_ras(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_official_layout`."""
    return np.ascontiguousarray(array.transpose(2, 1, 0)[::-1, ::-1, :])


def preprocess_official(volume: Volume, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """The official CovidCTNet preprocessing (see module docstring), output in the common RAS layout.

    The official code stacks DICOM slices as (slice, row, column) and zooms by (slice thickness, row spacing, column
    spacing) / 1 mm with the new shape rounded; we do the same on the exactly reoriented array.
    """
    from scipy import ndimage
    from skimage.transform import resize

    ras, affine = to_ras(volume)
    stack = ras_to_official_layout(ras)  # (Z, rows, cols) as in the official code
    sx, sy, sz = (float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    spacing = np.array([sz, sy, sx])  # (slice, row, column)
    target = np.array([cfg.spacing_mm[2], cfg.spacing_mm[1], cfg.spacing_mm[0]], dtype=float)
    new_shape = np.round(np.array(stack.shape) * spacing / target)
    factors = new_shape / np.array(stack.shape)
    order = 3 if cfg.interpolation == "cubic" else 1
    zoomed = ndimage.zoom(stack.astype(np.float32), factors, order=order, mode="nearest", output=np.float32)
    if cfg.out_of_window == "air":
        zoomed[(zoomed > cfg.hu_max) | (zoomed < cfg.hu_min)] = cfg.hu_min
    else:
        np.clip(zoomed, cfg.hu_min, cfg.hu_max, out=zoomed)
    zoomed -= cfg.hu_min
    zoomed /= cfg.hu_max - cfg.hu_min
    np.clip(zoomed, 0.0, 1.0, out=zoomed)
    out = resize(zoomed, (zoomed.shape[0], cfg.size_xy, cfg.size_xy), anti_aliasing=True).astype(np.float32)

    # Geometry: voxel centres of the zoomed grid follow scipy's zoom (corners aligned), then skimage's resize
    # (pixel-area aligned) in-plane.
    n_in = np.array(stack.shape, dtype=float)
    n_zoom = np.array(zoomed.shape, dtype=float)
    step_zoom = np.where(n_zoom > 1, (n_in - 1) / np.maximum(n_zoom - 1, 1), 1.0)  # in input voxels (slice,row,col)
    in_plane = n_zoom[1:] / cfg.size_xy
    # Official (slice,row,col) index → RAS (x,y,z) index: x = X-1-col, y = Y-1-row, z = slice.
    X, Y = ras.shape[0], ras.shape[1]
    vox = np.eye(4)
    # column c_out → zoomed col (c_out + 0.5) * in_plane[1] - 0.5 → input col * step; x = X-1-col_in
    vox[0, 0] = -in_plane[1] * step_zoom[2]
    vox[0, 3] = X - 1 - ((0.5 * in_plane[1] - 0.5) * step_zoom[2])
    vox[1, 1] = -in_plane[0] * step_zoom[1]
    vox[1, 3] = Y - 1 - ((0.5 * in_plane[0] - 0.5) * step_zoom[1])
    vox[2, 2] = step_zoom[0]
    # Output RAS array index (i, j, k) ← official (k, size-1-j, size-1-i) after the flip back.
    flip = np.eye(4)
    flip[0, 0] = -1
    flip[0, 3] = cfg.size_xy - 1
    flip[1, 1] = -1
    flip[1, 3] = cfg.size_xy - 1
    # vox maps (col_out, row_out, slice_out) → RAS input index; flip maps RAS output index → (col_out, row_out, ...).
    out_affine = affine @ vox @ flip
    return official_layout_to_ras(out), out_affine


PREPROCESS_COLUMNS = ("input_shape", "input_spacing_mm", "output_shape", "output_spacing_mm", "checks")


def _dims_text(values: Any, digits: int = 4) -> str:
    """``64x64x50`` / ``0.7812x0.7812x5``: a shape or spacing for logs and the manifest (floats to ``digits``
    significant digits)."""
    return "x".join(f"{float(v):.{digits}g}" if isinstance(v, float) else str(v) for v in values)


def preprocess_study(study: Any, out_dir: Path, cfg: PreprocessConfig, series_uid: str | None = None) -> dict[str, Any]:
    """Read, check and preprocess one study, writing ``out_dir/<study_id>.nii.gz`` atomically.

    Returns:
        The study's manifest columns (see :data:`PREPROCESS_COLUMNS`).
    """
    volume = read_volume(study.path, series_uid)
    passed = check_volume(volume, cfg.limits)
    array, affine = preprocess_volume(volume, cfg)
    name = f"{study.study_id}.nii.gz"
    write_nifti(array, affine, Path(out_dir) / name)
    out_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    logger.info(
        "%s: %s voxels of %s mm -> %s", study.study_id, _dims_text(volume.shape), _dims_text(volume.spacing),
        _dims_text(array.shape),
    )
    return {
        "output": name,
        "input_shape": _dims_text(volume.shape),
        "input_spacing_mm": _dims_text(volume.spacing),
        "output_shape": _dims_text(array.shape),
        "output_spacing_mm": _dims_text(tuple(float(s) for s in out_spacing)),
        "checks": " ".join(passed),
    }


def preprocess_studies(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: PreprocessConfig = PreprocessConfig(),
    *,
    resume: bool = True,
    workers: int = 0,
    series_uid: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    scheduler: str | None = None,
) -> BatchSummary:
    """``covidctnet preprocess``: preprocess every study found in ``inputs`` into ``out_dir``.

    Writes ``out_dir/<study_id>.nii.gz``, ``out_dir/manifest.csv`` and ``out_dir/preprocess.yaml`` (the resolved
    config). See :func:`covidctnet.io.batch.run_batch` for resume, workers and error handling.
    """
    studies = discover_studies(inputs)
    if series_uid is not None and len(studies) != 1:
        raise ConfigError(f"--series-uid selects a series in ONE DICOM folder; {len(studies)} studies were given")
    fn = functools.partial(preprocess_study, cfg=cfg, series_uid=series_uid)
    summary = run_batch(
        studies,
        out_dir,
        fn,
        PREPROCESS_COLUMNS,
        resume=resume,
        workers=workers,
        desc="preprocess",
        on_result=on_result,
        scheduler=scheduler,
    )
    if summary.n_ok + summary.n_skipped > 0:
        save_config(cfg, Path(out_dir) / "preprocess.yaml")
    return summary
