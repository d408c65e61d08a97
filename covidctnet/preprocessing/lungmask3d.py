"""A classical 3D lung mask from Hounsfield units (no learned model, no downloaded weights).

Used to score residuals inside the lungs (``covidctnet slice-scores``), to outline the lungs in overlays
(``predict --save-residuals``) and for the chest-coverage check (a scan with too little lung is refused).

Steps, on the volume reoriented to RAS and averaged in-plane to about ``work_pixel_mm`` (2.5 mm by default: the mask
only has to be right to a few mm; its cost: ``docs/implementation-notes.md``):

1. air candidates: ``HU < air_hu_max`` (−320 HU, the classical lung threshold; ground glass, about −600 HU, is in);
2. airway and gas bubbles: per axial slice, small components (< ``airway_max_area_cm2``) whose mean HU is below
   ``airway_hu_max`` (−900) are removed. The trachea and main bronchi are pure air (about −1000 HU) in the
   mediastinum, while even the smallest cross-sections of lung (apex, bases) hold parenchyma and vessels and average
   about −850 HU, so density separates them where size alone would not;
3. outside air, bowel gas and the table: 3D components whose median HU is below ``gas_median_hu`` (−950) are not
   lung (parenchyma's median is about −850; air outside the body, in the stomach or the bowel is about −1000). This
   also works on tight crops whose lungs touch the image border, where "drop border-connected air" would drop the
   lungs. Components less than ``min_depth_mm`` deep (antero-posterior), or lying along most of the posterior image
   edge from its left to its right edge with a median below ``table_median_hu`` (the table's foam and the air
   under it), are dropped too;
4. two lungs: the two largest remaining 3D components (each at least ``min_component_ml``); when the lungs touch
   (anterior junction) and form one component, it is split by eroding until two cores appear and growing them back;
5. holes and vessels: each lung is closed in 3D (ball of ``closing_mm``) and its holes are filled slice by slice, so
   vessels, nodules and lesions enclosed by lung are inside the mask.

Known limits: consolidation (about 0 HU) that reaches the pleura is a notch in the mask, not inside it (closing fills
notches up to about ``closing_mm``); lungs cut by the field of view are measured only where they are imaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from covidctnet.core.errors import ConfigError, InputError, NoLungsError
from covidctnet.io.volume import Volume
from covidctnet.preprocessing.preprocess import linear_resize, to_ras

__all__ = ["LungMaskConfig", "LungMask", "lung_mask_3d", "NoLungsError", "check_chest_coverage", "ras_lung_mask",
           "mask_to_grid"]


@dataclass(frozen=True)
class LungMaskConfig:
    """Settings of the 3D lung mask and the chest-coverage check.

    Attributes:
        air_hu_max: voxels below this HU are air/lung candidates (−320, the classical threshold).
        airway_hu_max: a small per-slice component whose mean HU is below this is airway or a gas bubble.
        airway_max_area_cm2: only per-slice components smaller than this (cm²) can be removed as airway.
        gas_median_hu: a 3D component whose median HU is below this is outside air or gas, not lung.
        min_component_ml: a lung component must hold at least this volume (ml).
        min_lung_share: the smaller lung must hold at least this share of the larger one's volume (else the larger
            component is taken for both lungs joined and split).
        min_depth_mm: a lung component spans at least this antero-posterior depth (mm); thinner air is the table.
        table_median_hu: a component along the posterior image edge, from its left to its right edge, with a median
            HU below this is the table's foam and the air under it.
        closing_mm: radius (mm) of the 3D closing that closes vessels and notches at the lung border.
        work_pixel_mm: in-plane pixel size (mm) the mask is computed at (integer block average of the input).
        min_lung_ml: the chest-coverage check refuses scans whose lung volume is below this (ml).
    """

    air_hu_max: float = -320.0
    airway_hu_max: float = -900.0
    airway_max_area_cm2: float = 12.0
    gas_median_hu: float = -950.0
    min_component_ml: float = 15.0
    min_lung_share: float = 0.15
    min_depth_mm: float = 80.0
    table_median_hu: float = -875.0
    closing_mm: float = 6.0
    work_pixel_mm: float = 2.5
    min_lung_ml: float = 500.0

    def __post_init__(self) -> None:
        if not self.gas_median_hu < self.airway_hu_max < self.air_hu_max:
            raise ConfigError("'gas_median_hu' < 'airway_hu_max' < 'air_hu_max' must hold, not "
                              f"{self.gas_median_hu}, {self.airway_hu_max}, {self.air_hu_max}")
        for key in ("airway_max_area_cm2", "work_pixel_mm"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"'{key}' must be > 0, not {getattr(self, key)}")
        for key in ("min_component_ml", "closing_mm", "min_lung_ml"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, not {getattr(self, key)}")


@dataclass
class LungMask:
    """A lung mask on the grid of the HU array it was computed from.

    Attributes:
        mask: (X, Y, Z) uint8: 0 outside, 1 and 2 the two lungs (1 = the lung at larger x), same grid as the input.
        spacing: (3,) voxel size (mm) of that grid.
        n_lungs: number of lung components found (0, 1 or 2).
    """

    mask: np.ndarray
    spacing: tuple[float, float, float]
    n_lungs: int

    @property
    def volume_ml(self) -> float:
        """Total lung volume (ml)."""
        return float(np.count_nonzero(self.mask)) * float(np.prod(self.spacing)) / 1000.0

    def lung_volumes_ml(self) -> tuple[float, ...]:
        """Volume (ml) of each lung component, in label order."""
        voxel = float(np.prod(self.spacing)) / 1000.0
        return tuple(float(np.count_nonzero(self.mask == k)) * voxel for k in range(1, self.n_lungs + 1))

    def slice_ml(self) -> np.ndarray:
        """(Z,) lung volume (ml) in each axial slice (axis 2)."""
        voxel = float(np.prod(self.spacing)) / 1000.0
        return np.count_nonzero(self.mask, axis=(0, 1)).astype(np.float64) * voxel


def _block_mean(hu: np.ndarray, factor: tuple[int, int]) -> np.ndarray:
    """Average (X, Y, Z) over in-plane blocks of ``factor`` (edge blocks padded with the edge value)."""
    fx, fy = factor
    if fx == fy == 1:
        return hu.astype(np.float32, copy=False)
    x, y, z = hu.shape
    px, py = (-x) % fx, (-y) % fy
    if px or py:
        hu = np.pad(hu, ((0, px), (0, py), (0, 0)), mode="edge")
    return hu.reshape(hu.shape[0] // fx, fx, hu.shape[1] // fy, fy, z).mean(axis=(1, 3), dtype=np.float32)


def _closing(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """3D binary closing with a ball of ``radius_mm`` (anisotropic voxels), by two Euclidean distance transforms
    (several times faster than a structuring element of the same size). The array is padded so that a mask touching
    the volume's edge is not eroded by it."""
    from scipy import ndimage as ndi

    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing]
    m = np.pad(mask, [(p, p) for p in pad])
    dilated = ndi.distance_transform_edt(~m, sampling=spacing) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    return closed[tuple(slice(p, -p) for p in pad)]


def _split_in_two(component: np.ndarray, min_voxels: int, spacing: tuple[float, float, float],
                  max_depth_mm: float = 25.0) -> np.ndarray | None:
    """Split one (X, Y, Z) bool component into two lungs: erode (by thresholding its distance transform) until two
    large cores appear, then give every voxel to its nearest core. Returns labels 1/2 (0 elsewhere), or ``None`` when
    no erosion up to ``max_depth_mm`` separates it."""
    from scipy import ndimage as ndi

    box = ndi.find_objects(component.astype(np.uint8))[0]
    comp = component[box]
    depth = ndi.distance_transform_edt(comp, sampling=spacing)
    step = min(spacing)
    for d in np.arange(step, max_depth_mm + step, step):
        labels, n = ndi.label(depth > d)
        if n < 2:
            if n == 0:
                return None
            continue
        sizes = np.bincount(labels.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        if sizes[order[1]] < min_voxels:
            continue
        seeds = np.zeros(comp.shape, dtype=np.uint8)
        seeds[labels == order[0] + 1] = 1
        seeds[labels == order[1] + 1] = 2
        _, (ix, iy, iz) = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
        out = np.zeros(component.shape, dtype=np.uint8)
        out[box] = np.where(comp, seeds[ix, iy, iz], 0)
        return out
    return None


def _remove_airways(cand: np.ndarray, small: np.ndarray, wsp: tuple[float, float, float],
                    cfg: LungMaskConfig) -> None:
    """Step 2: clear, in place, the small per-slice components of ``cand`` that are nearly pure air.

    Components are taken slice by slice (2D): in 3D the trachea and bronchi would join the lungs.

    Args:
        cand: (X, Y, Z) bool air candidates on the working grid; modified in place.
        small: (X, Y, Z) HU on the working grid.
        wsp: (3,) working voxel size (mm).
        cfg: ``airway_max_area_cm2`` and ``airway_hu_max`` are used.
    """
    from scipy import ndimage as ndi

    max_area = cfg.airway_max_area_cm2 * 100.0 / (wsp[0] * wsp[1])
    for k in range(cand.shape[2]):
        lab, n = ndi.label(cand[:, :, k])
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        area = ndi.sum_labels(np.ones_like(lab), lab, idx)
        mean = ndi.mean(small[:, :, k], lab, idx)
        drop = idx[(area < max_area) & (mean < cfg.airway_hu_max)]
        if drop.size:
            cand[:, :, k][np.isin(lab, drop)] = False


def _is_table(one: np.ndarray, values: np.ndarray, width: int, cfg: LungMaskConfig) -> bool:
    """Whether a component lying on the posterior image edge from its left to its right edge is the table.

    The foam of the scanner table and the air under it reach the left and right image edges and have a median of
    about -895 HU; lungs cut by a tight crop can lie along that edge too, but hold parenchyma and vessels (median
    -850 HU and above).

    Args:
        one: the component inside its bounding box (bool), whose y index 0 is the posterior image edge.
        values: HU of the component's voxels.
        width: image width (voxels along x) on the working grid.
        cfg: ``table_median_hu`` is used.
    """
    # the share of the image width along which the component lies on the posterior image edge
    along = np.count_nonzero(one[:, 0, :], axis=0) / width
    return float(np.median(along)) >= 0.5 and float(np.median(values)) < cfg.table_median_hu


def _lung_candidates(cand: np.ndarray, small: np.ndarray, wsp: tuple[float, float, float], voxel_ml: float,
                     cfg: LungMaskConfig) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Step 3: the 3D components of ``cand`` that can be lung, largest first.

    Dropped: components under ``min_component_ml``, flat in the antero-posterior direction (a lung is at least
    ``min_depth_mm`` deep), the table band along the posterior edge, and nearly pure air (outside air, bowel gas:
    median below ``gas_median_hu``).

    Args:
        cand: (X, Y, Z) bool air candidates on the working grid.
        small: (X, Y, Z) HU on the working grid.
        wsp: (3,) working voxel size (mm).
        voxel_ml: volume of one working voxel (ml).
        cfg: thresholds and sizes.

    Returns:
        ``(labels, keep)``: (X, Y, Z) int component labels, and ``(voxel count, label)`` of each kept component in
        decreasing order.
    """
    from scipy import ndimage as ndi

    lab, n = ndi.label(cand)
    keep: list[tuple[int, int]] = []
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        boxes = ndi.find_objects(lab)
        for i in range(1, n + 1):
            if sizes[i] * voxel_ml < cfg.min_component_ml:
                continue
            box = boxes[i - 1]
            if (box[1].stop - box[1].start) * wsp[1] < cfg.min_depth_mm:
                continue
            if box[1].start == 0 and box[0].start == 0 and box[0].stop == small.shape[0]:
                one = lab[box] == i
                if _is_table(one, small[box][one], small.shape[0], cfg):
                    continue
            if float(np.median(small[box][lab[box] == i])) >= cfg.gas_median_hu:
                keep.append((int(sizes[i]), i))
    keep.sort(reverse=True)
    return lab, keep


def _two_lungs(lab: np.ndarray, keep: list[tuple[int, int]], wsp: tuple[float, float, float], voxel_ml: float,
               cfg: LungMaskConfig) -> np.ndarray:
    """Step 4: label the two lungs among the kept components.

    Two components of comparable size (the smaller at least ``min_lung_share`` of the larger) are the lungs; else
    the largest is taken for both lungs joined (anterior junction, carina) and split, or kept whole when it cannot
    be split.

    Args:
        lab: (X, Y, Z) component labels of :func:`_lung_candidates`.
        keep: its ``(voxel count, label)`` list, largest first.
        wsp: (3,) working voxel size (mm).
        voxel_ml: volume of one working voxel (ml).
        cfg: ``min_lung_share`` and ``min_component_ml`` are used.

    Returns:
        (X, Y, Z) uint8: 0 outside, 1 and 2 the lungs (in no particular side order).
    """
    mask = np.zeros(lab.shape, dtype=np.uint8)
    min_vox = int(np.ceil(cfg.min_component_ml / voxel_ml))
    if len(keep) >= 2 and keep[1][0] >= cfg.min_lung_share * keep[0][0]:
        mask[lab == keep[0][1]] = 1
        mask[lab == keep[1][1]] = 2
    elif keep:
        largest = lab == keep[0][1]
        split = _split_in_two(largest, max(min_vox, int(cfg.min_lung_share * keep[0][0])), wsp)
        if split is not None:
            mask = split
        else:
            mask[largest] = 1
    return mask


def _right_lung_first(mask: np.ndarray) -> np.ndarray:
    """Relabel a two-lung (X, Y, Z) uint8 mask so that 1 is the lung at larger x (the patient's right in RAS), so
    that labels mean the same across scans."""
    xs = np.arange(mask.shape[0])[:, None, None]
    c1 = float((xs * (mask == 1)).sum()) / max(1, np.count_nonzero(mask == 1))
    c2 = float((xs * (mask == 2)).sum()) / max(1, np.count_nonzero(mask == 2))
    if c2 > c1:
        return np.where(mask == 0, 0, 3 - mask).astype(np.uint8)
    return mask


def _close_and_fill(mask: np.ndarray, n_lungs: int, wsp: tuple[float, float, float],
                    cfg: LungMaskConfig) -> np.ndarray:
    """Step 5: close each lung in 3D (ball of ``closing_mm``), then fill its holes slice by slice.

    Each lung is closed on its own, so that the closing never bridges the mediastinum.

    Args:
        mask: (X, Y, Z) uint8 lung labels 1..``n_lungs`` on the working grid.
        n_lungs: number of lungs in ``mask``.
        wsp: (3,) working voxel size (mm).
        cfg: ``closing_mm`` is used (0: no closing).

    Returns:
        (X, Y, Z) uint8 labels with vessels, nodules and lesions enclosed by lung inside.
    """
    from scipy import ndimage as ndi

    if cfg.closing_mm > 0 and n_lungs:
        closed = np.zeros_like(mask)
        for k in range(1, n_lungs + 1):
            box = ndi.find_objects((mask == k).astype(np.uint8))[0]
            one = _closing(mask[box] == k, cfg.closing_mm, wsp)
            region = closed[box]
            region[one & (region == 0)] = k
        mask = closed
    for k in range(mask.shape[2]):
        for lung in range(1, n_lungs + 1):
            filled = ndi.binary_fill_holes(mask[:, :, k] == lung)
            mask[:, :, k][filled & (mask[:, :, k] == 0)] = lung
    return mask


def lung_mask_3d(hu: np.ndarray, spacing: tuple[float, float, float],
                 cfg: LungMaskConfig = LungMaskConfig()) -> LungMask:
    """Lung mask of a CT volume in HU.

    Args:
        hu: (X, Y, Z) HU, axis 2 = axial slices (e.g. the RAS array of
            :func:`covidctnet.preprocessing.preprocess.to_ras`; any
            axial orientation works, the mask is on the same grid).
        spacing: (3,) voxel size in mm along X, Y, Z.
        cfg: thresholds and sizes.

    Returns:
        The mask on the input grid, with the number of lungs found.

    Raises:
        InputError: the array is not 3-D.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError(f"lung mask needs a 3-D volume, not shape {hu.shape}")
    sx, sy, sz = (float(s) for s in spacing)
    factor = (max(1, round(cfg.work_pixel_mm / sx)), max(1, round(cfg.work_pixel_mm / sy)))
    small = _block_mean(hu, factor)
    wsp = (sx * factor[0], sy * factor[1], sz)
    voxel_ml = wsp[0] * wsp[1] * wsp[2] / 1000.0

    cand = small < cfg.air_hu_max
    _remove_airways(cand, small, wsp, cfg)
    lab, keep = _lung_candidates(cand, small, wsp, voxel_ml, cfg)
    mask = _two_lungs(lab, keep, wsp, voxel_ml, cfg)
    n_lungs = int(mask.max())
    if n_lungs == 2:
        mask = _right_lung_first(mask)
    mask = _close_and_fill(mask, n_lungs, wsp, cfg)
    if factor != (1, 1):
        mask = np.repeat(np.repeat(mask, factor[0], axis=0), factor[1], axis=1)[: hu.shape[0], : hu.shape[1]]
    return LungMask(np.ascontiguousarray(mask), (sx, sy, sz), n_lungs)


def check_chest_coverage(lungs: LungMask, source: str, cfg: LungMaskConfig = LungMaskConfig()) -> None:
    """Refuse a scan with too little lung to be a chest CT.

    Raises:
        NoLungsError: lung volume under ``cfg.min_lung_ml``; the message names ``source`` and the volume found.
    """
    volume = lungs.volume_ml
    if volume < cfg.min_lung_ml:
        raise NoLungsError(f"{source}: no lungs found: not a chest CT? (lung volume {volume:.0f} ml, minimum "
                           f"{cfg.min_lung_ml:.0f} ml)")


def ras_lung_mask(volume: Volume, min_lung_ml: float | None = None) -> tuple[np.ndarray, np.ndarray, LungMask]:
    """The volume reoriented to RAS (exact flips and axis swaps) and its 3D lung mask.

    Args:
        volume: a CT in HU (:func:`covidctnet.io.volume.read_volume`).
        min_lung_ml: when given, run the chest-coverage check with this minimum.

    Returns:
        ``(hu, affine, lungs)``: (X, Y, Z) HU in RAS (axis 2 = slices, inferior to superior; may be a view of
        ``volume.array``: copy it before writing), its (4, 4) affine, and the lung mask on that grid.

    Raises:
        NoLungsError: less lung than ``min_lung_ml``.
    """
    hu, affine = to_ras(volume, contiguous=False)  # a copy of a 512×512×300 scan costs 0.5-0.8 s
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    cfg = LungMaskConfig() if min_lung_ml is None else replace(LungMaskConfig(), min_lung_ml=min_lung_ml)
    lungs = lung_mask_3d(hu, spacing, cfg)  # type: ignore[arg-type]
    if min_lung_ml is not None:
        check_chest_coverage(lungs, str(volume.source), cfg)
    return hu, affine, lungs


def mask_to_grid(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a (X, Y, Z) bool mask to ``shape`` over the same field of view (trilinear, edges on edges, as the
    preprocessing's resize), keeping voxels whose interpolated value is at least 0.5.

    Returns:
        ``shape`` bool.
    """
    if tuple(mask.shape) == tuple(shape):
        return np.asarray(mask, dtype=bool)
    return linear_resize(np.asarray(mask, dtype=np.float32), shape) >= 0.5
