"""A classical lung mask for a grey-scale CT slice image (no HU, no learned model).

The UCSD COVID-CT images are figures cut out of papers: 8-bit grey-scale (or RGB) renderings with an unknown window,
often with text, arrows or a border. Pretrained lung-segmentation networks cannot be downloaded here, so the mask is
built from image processing alone:

1. smooth lightly and split dark from bright with Otsu's threshold (lungs are the large dark regions);
2. drop dark components that touch the image border (air outside the body, the figure background);
3. keep the (up to) two largest remaining components that are big enough and tall enough to be a lung;
4. close and fill holes, so that vessels and brighter lesions inside the lung (ground glass, consolidation) are
   part of the mask instead of holes in it.

When no component qualifies (e.g. a crop with no body outline), the mask is empty: the network then sees a zero channel,
which it learns to treat as "no mask information".
"""

from __future__ import annotations

import numpy as np

__all__ = ["lung_mask"]


def lung_mask(
    image: np.ndarray,
    min_area_fraction: float = 0.01,
    closing_fraction: float = 0.02,
    max_components: int = 2,
) -> np.ndarray:
    """Lung mask of a grey-scale slice image.

    Args:
        image: (H, W) float in [0, 1] (any range works; it is rescaled to [0, 1] first).
        min_area_fraction: smallest component kept, as a fraction of H·W.
        closing_fraction: radius of the closing disk as a fraction of min(H, W).
        max_components: keep at most this many components (two lungs).

    Returns:
        (H, W) bool mask, True inside the lungs.
    """
    from scipy import ndimage as ndi
    from skimage import filters, measure, morphology

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), not shape {img.shape}")
    lo, hi = float(img.min()), float(img.max())
    if hi - lo < 1e-6:
        return np.zeros(img.shape, dtype=bool)
    img = (img - lo) / (hi - lo)
    smooth = filters.gaussian(img, sigma=max(1.0, min(img.shape) / 200))
    dark = smooth < filters.threshold_otsu(smooth)
    labels = measure.label(dark, connectivity=1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    dark[np.isin(labels, border[border > 0])] = False  # outside air and background touch the border
    labels = measure.label(dark, connectivity=1)
    regions = sorted(measure.regionprops(labels), key=lambda r: r.area, reverse=True)
    min_area = min_area_fraction * img.size
    # a lung is tall: thin bands (the gap between the back and the scanner table) are not lungs
    tall = [r for r in regions if r.area >= min_area and (r.bbox[2] - r.bbox[0]) >= 0.15 * img.shape[0]]
    keep = [r.label for r in tall[:max_components]]
    mask = np.isin(labels, keep)
    if not mask.any():
        return mask
    radius = max(1, int(round(closing_fraction * min(img.shape))))
    # pad before closing so that lungs near the image edge are not eroded by the border
    mask = ndi.binary_closing(np.pad(mask, radius), morphology.disk(radius))[radius:-radius, radius:-radius]
    return ndi.binary_fill_holes(mask)
