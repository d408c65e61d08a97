"""``covidctnet calibrate-cam``: record a slice model directory's Grad-CAM colour scale from the images it was
validated on.

``train-slice``, ``ensemble-slice --data`` and ``cv-slice`` record ``cam_scale`` when they write a model directory;
this computes it again, or for the first time for a directory written before they did, and writes it into the
directory's ``config.yaml`` (and its line of ``SHA256SUMS``), weights untouched:

* a ``cv-slice`` ensemble (``cross_validation`` in its config): its out-of-fold images, i.e. every ``train`` and
  ``val`` image of the data it was cross-validated on (each held out by one member), with the ensemble's own maps
  (:func:`~covidctnet.training.slice_cv.oof_cam_scale`); a dataset of another size than the run's is refused;
* any other slice model: the validation split of ``data``, with the model as a whole.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError
from covidctnet.core.model_dir import update_model_config
from covidctnet.data.ucsd import SliceDataset, find_records
from covidctnet.models.grad_cam import CamScale, CamScaleConfig
from covidctnet.models.registry import load_slice_model
from covidctnet.training.slice import dataset_cam_scale
from covidctnet.training.slice_cv import cv_records, oof_cam_scale

__all__ = ["calibrate_cam"]

logger = logging.getLogger(__name__)


def calibrate_cam(model_dir: str | os.PathLike, data: str | os.PathLike, cfg: CamScaleConfig | None = None,
                  device: str = "auto") -> CamScale:
    """Compute a slice model's Grad-CAM colour scale and record it as ``cam_scale`` in its ``config.yaml``.

    Args:
        model_dir: a slice model directory (rewritten in place, atomically; weights unchanged).
        data: the dataset it was validated on (UCSD or ``<split>/<class>/``): for a ``cv-slice`` ensemble the one it
            was cross-validated on (its ``train`` and ``val`` splits), otherwise its ``val`` split is used.
        cfg: percentile and ``show_from`` (default :class:`~covidctnet.models.grad_cam.CamScaleConfig`).
        device: where to compute the maps (``auto``, ``cpu``, ``cuda``).

    Returns:
        The scale written.

    Raises:
        ModelDirError: not a usable slice model directory.
        ConfigError: not the images a ``cv-slice`` ensemble was cross-validated on (another number), or no images.
    """
    cfg = cfg or CamScaleConfig()
    dev = resolve_device(device)
    model, config = load_slice_model(model_dir, "cpu")
    pre = config["preprocess"]
    cv = config.get("cross_validation")
    name = Path(data).resolve().name
    if cv:
        records = cv_records(data)
        expected = (cv.get("expected_performance") or {}).get("n")
        if expected is not None and int(expected) != len(records):
            raise ConfigError(f"{data}: {len(records)} train + val images, but {model_dir} was cross-validated on "
                              f"{int(expected)}; give the dataset it was trained on")
        scale = oof_cam_scale(model, records, pre["size"], pre["lung_mask"], name, cfg, dev)
    else:
        records = find_records(data, "val")
        if not records:
            raise ConfigError(f"{data}: no validation images")
        val = SliceDataset(records, pre["size"], pre["lung_mask"], None)
        scale = dataset_cam_scale(model, val, "validation split", f"{name} val", dev, cfg)
    update_model_config(model_dir, {"cam_scale": scale.to_dict()})
    logger.info("%s: Grad-CAM colour scale 0-%.4g %s (%s), coloured from %.4g", model_dir, scale.value, scale.unit,
                scale.describe(), scale.floor)
    return scale
