"""``covidctnet train-lesion-model``: a label-free lesion model trained on control scans only (NormNet-style).

Lesions are synthesised inside the lungs of control slices (:mod:`covidctnet.data.synthetic_lesions`: real lesion
shapes from the MosMed masks and random blobs, ground-glass and consolidation densities that keep the tissue's
texture, placed mostly peripheral and posterior) and a 2D MONAI U-Net learns to segment them inside the lung mask.
No labelled scan is used. Its input is two channels, the preprocessed slice (HU window [-1000, 400] → [0, 1], the
model's ``size_xy`` in-plane) and the slice's lung mask; its output is the lesion logit per pixel.

Data: each control scan (DICOM folder, NIfTI/NRRD file) is read, its 3D lung mask computed on the original grid
(:func:`covidctnet.preprocessing.lungmask3d.ras_lung_mask`), preprocessed, and the mask resampled onto the
preprocessed grid; slices whose lung covers at least ``min_lung_fraction`` of the slice are kept. The last
``val_fraction`` of each study's slices (its superior end) are held out with a fixed draw of lesions;
``val_dice`` (Dice of the thresholded prediction inside the lungs, over all held-out slices) is monitored.

Outputs in ``RUN_DIR``: ``config.yaml``, ``data.yaml``, ``checkpoints/``, ``metrics.csv``, ``samples/epoch_NNN.png``
and the model directory ``RUN_DIR/model`` (task ``lesion``, component ``lesion``) with ``MODEL_CARD.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from covidctnet.core.errors import ConfigError, InputError
from covidctnet.core.files import atomic_write_text
from covidctnet.core.seeding import seed_everything
from covidctnet.data.control_slices import evenly_spread
from covidctnet.data.synthetic_lesions import LesionSynthesis, SyntheticLesionSlices, mosmed_shapes
from covidctnet.evaluation.plots import new_figure, save_figure
from covidctnet.io.batch import discover_studies
from covidctnet.io.checks import check_volume
from covidctnet.io.volume import read_volume
from covidctnet.models.registry import LESION_COMPONENT, build_lesion_model
from covidctnet.preprocessing.lungmask3d import mask_to_grid, ras_lung_mask
from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_volume
from covidctnet.training.trainer import FitResult, LoopConfig, ModelExport, RunResult, Trainer

__all__ = ["LesionModelConfig", "ControlLungSlices", "control_lung_slices", "lesion_loss", "train_lesion_model"]

logger = logging.getLogger(__name__)

_MONITOR = "val_dice"


@dataclass(frozen=True)
class LesionModelConfig:
    """Settings of ``covidctnet train-lesion-model`` (defaults = ``configs/lesion_model.yaml``).

    Attributes:
        size_xy: in-plane size of the preprocessed slices (the model's input).
        channels, strides, num_res_units: MONAI ``UNet`` arguments (2D; input channels: slice and lung mask).
        synthesis: how lesions are synthesised (:class:`~covidctnet.data.synthetic_lesions.LesionSynthesis`).
        lesion_masks: folder of MosMed-style ``*_mask.nii.gz`` lesion masks whose shapes are used (``null``: random
            blobs only).
        min_lung_fraction: a slice trains when its lung covers at least this fraction of it.
        lr, weight_decay: AdamW settings.
        batch_size: slices per optimiser step.
        epochs, steps_per_epoch, max_steps, checkpoint_every, patience: the training loop (see ``train-denoiser``).
        val_fraction: share of each study's slices held out (its superior end) to monitor training.
        val_max_slices: at most this many held-out slices (evenly spread).
        seed: run seed (weights, order, lesions).
        device: ``auto`` / ``cpu`` / ``cuda[:N]``.
        num_workers: DataLoader worker processes synthesising lesions.
    """

    size_xy: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    synthesis: LesionSynthesis = field(default_factory=LesionSynthesis)
    lesion_masks: str | None = None
    min_lung_fraction: float = 0.03
    lr: float = 0.001
    weight_decay: float = 0.0001
    batch_size: int = 16
    epochs: int = 20
    steps_per_epoch: int | None = 100
    max_steps: int | None = None
    checkpoint_every: int | None = 100
    patience: int | None = None
    val_fraction: float = 0.25
    val_max_slices: int = 200
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) + 1:
            raise ConfigError(f"'channels' needs one entry more than 'strides', not {self.channels} / {self.strides}")
        factor = int(np.prod(self.strides))
        if self.size_xy % factor:
            raise ConfigError(f"'size_xy' must be a multiple of {factor} (the product of 'strides'), "
                              f"not {self.size_xy}")
        if not 0.0 < self.val_fraction < 0.9:
            raise ConfigError(f"'val_fraction' must be in (0, 0.9), not {self.val_fraction}")
        if not 0.0 <= self.min_lung_fraction < 1.0:
            raise ConfigError(f"'min_lung_fraction' must be in [0, 1), not {self.min_lung_fraction}")

    def model_kwargs(self) -> dict[str, Any]:
        """The ``kwargs`` of the model directory's ``lesion`` component."""
        return {"in_channels": 2, "out_channels": 1, "channels": list(self.channels), "strides": list(self.strides),
                "num_res_units": self.num_res_units}


@dataclass
class ControlLungSlices:
    """Lung-bearing axial slices of control scans on the preprocessed grid.

    Attributes:
        images: (N, S, S) float32 in [0, 1].
        lungs: (N, S, S) bool.
        pixel_mm: (N,) in-plane pixel size.
        study_ids: (N,) study of each slice.
    """

    images: np.ndarray
    lungs: np.ndarray
    pixel_mm: np.ndarray
    study_ids: np.ndarray

    def subset(self, index: np.ndarray) -> ControlLungSlices:
        return ControlLungSlices(self.images[index], self.lungs[index], self.pixel_mm[index], self.study_ids[index])


def control_lung_slices(inputs: Sequence[str | os.PathLike], preprocess: PreprocessConfig,
                        min_lung_fraction: float = 0.03) -> ControlLungSlices:
    """Read control scans and keep their lung-bearing slices, preprocessed, with their lung masks.

    Args:
        inputs: DICOM folders, NIfTI/NRRD files or folders of them (:func:`covidctnet.io.batch.discover_studies`).
        preprocess: the preprocessing (its ``size_xy`` is the slices' size).
        min_lung_fraction: keep slices whose lung covers at least this fraction.

    Returns:
        The slices, as (N, S, S) arrays with axes (X, Y) of the RAS preprocessed volume.

    Raises:
        InputError: an unreadable scan, or no slice with lung at all.
    """
    images, lungs, pixel, ids = [], [], [], []
    for study in discover_studies(inputs):
        volume = read_volume(study.path)
        check_volume(volume, preprocess.limits)
        _, _, mask = ras_lung_mask(volume)  # no coverage check: a crop with little lung may still teach something
        array, affine = preprocess_volume(volume, preprocess)
        grid = mask_to_grid(mask.mask > 0, array.shape)
        frac = grid.mean(axis=(0, 1))
        keep = np.flatnonzero(frac >= min_lung_fraction)
        logger.info("%s: %d of %d slices with lung", study.study_id, keep.size, array.shape[2])
        images.append(np.moveaxis(array[:, :, keep], 2, 0).astype(np.float32))
        lungs.append(np.moveaxis(grid[:, :, keep], 2, 0))
        pixel.append(np.full(keep.size, float(np.linalg.norm(affine[:3, 0]))))
        ids.append(np.full(keep.size, study.study_id, dtype=object))
    if not images or sum(len(a) for a in images) == 0:
        raise InputError(f"{', '.join(map(str, inputs))}: no slice with lung in the control scans")
    return ControlLungSlices(np.concatenate(images), np.concatenate(lungs), np.concatenate(pixel),
                             np.concatenate(ids))


def lesion_loss(logits: torch.Tensor, target: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice, both inside the lungs only.

    Args:
        logits, target, lung: (B, 1, S, S).
    """
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * lung).sum() / lung.sum().clamp_min(1.0)
    prob = torch.sigmoid(logits) * lung
    dice = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + dice


def _split(data: ControlLungSlices, fraction: float, max_val: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and held-out slices: the superior ``fraction`` of each study's slices is held out.

    Each study keeps most of its slices for training (there are few control scans); the held-out block monitors
    training on lesions never drawn for it, it is not an estimate of performance on real lesions.
    """
    val: list[np.ndarray] = []
    for study in dict.fromkeys(data.study_ids.tolist()):
        idx = np.flatnonzero(data.study_ids == study)  # ascending z within a study
        val.append(idx[len(idx) - max(1, round(len(idx) * fraction)):])
    held = np.concatenate(val)
    train = np.setdiff1d(np.arange(len(data.images)), held)
    return train, np.asarray(evenly_spread(held, max_val))


def _validation(val: SyntheticLesionSlices, batch: int = 16):
    def validate(net: nn.Module, device: torch.device) -> dict[str, float]:
        inter = total = loss = 0.0
        with torch.no_grad():
            for i in range(0, len(val), batch):
                items = [val[j] for j in range(i, min(i + batch, len(val)))]
                x = torch.stack([it["image"] for it in items]).to(device)
                y = torch.stack([it["target"] for it in items]).to(device)
                lung = torch.stack([it["lung"] for it in items]).to(device)
                logits = net(x)
                loss += float(lesion_loss(logits, y, lung)) * len(items)
                pred = (logits > 0).float() * lung
                inter += float((pred * y).sum())
                total += float(pred.sum() + y.sum())
        return {"val_loss": loss / len(val), "val_dice": 2.0 * inter / max(total, 1.0)}
    return validate


def _sample_writer(val: SyntheticLesionSlices) -> Callable[[int, nn.Module, Path], None]:
    """The epoch callback writing ``samples/epoch_NNN.png``: three validation slices with their synthetic lesions,
    the lesion targets and the predicted probability inside the lung. The Trainer runs it in eval mode, without
    gradients, never failing."""
    index = [len(val) // 4, len(val) // 2, 3 * len(val) // 4]

    def write(epoch: int, net: nn.Module, out_dir: Path) -> None:
        items = [val[i] for i in index]
        x = torch.stack([it["image"] for it in items]).to(next(net.parameters()).device)
        prob = torch.sigmoid(net(x)).cpu().numpy()[:, 0]
        fig = new_figure(figsize=(9, 3 * len(items)))
        axes = fig.subplots(len(items), 3, squeeze=False)
        for r, it in enumerate(items):
            img, lung = it["image"][0].numpy(), it["image"][1].numpy()
            for c, (title, pic) in enumerate((("slice with lesions", img), ("synthetic lesion", it["target"][0]),
                                              ("predicted (in lung)", prob[r] * lung))):
                ax = axes[r][c]
                ax.imshow(np.rot90(np.asarray(pic)), cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        save_figure(fig, out_dir / "samples" / f"epoch_{epoch:03d}.png")

    return write


def train_lesion_model(
    controls: Sequence[str | os.PathLike],
    run_dir: str | os.PathLike,
    cfg: LesionModelConfig = LesionModelConfig(),
    *,
    resume: bool = False,
    command: str | None = None,
    show_progress: bool | None = None,
) -> RunResult:
    """Train the lesion model on synthetic lesions in control scans.

    Args:
        controls: control scans (DICOM folders, NIfTI/NRRD files, or folders of them); no labelled scan is needed.
        run_dir: output folder (module docstring); must not hold a run unless ``resume``.
        cfg: the resolved config.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        command: the command line, recorded in the model card.
        show_progress: progress bar (``None``: on an interactive terminal).

    Returns:
        :class:`~covidctnet.training.trainer.RunResult`.

    Raises:
        InputError: unreadable scans or no lung slice; a missing lesion-mask folder.
        CheckpointError: ``resume`` without a checkpoint, or an existing run without ``resume``.
    """
    run_dir = Path(run_dir)
    preprocess = PreprocessConfig(size_xy=cfg.size_xy)
    data = control_lung_slices(controls, preprocess, cfg.min_lung_fraction)
    shapes = mosmed_shapes(cfg.lesion_masks) if cfg.lesion_masks else []
    train_idx, val_idx = _split(data, cfg.val_fraction, cfg.val_max_slices)
    train, held = data.subset(train_idx), data.subset(val_idx)
    train_ds = SyntheticLesionSlices(train.images, train.lungs, train.pixel_mm, shapes, cfg.synthesis)
    val_ds = SyntheticLesionSlices(held.images, held.lungs, held.pixel_mm, shapes, cfg.synthesis, seed=cfg.seed,
                                   fixed=True, augment=False)
    split = {"mode": "superior slices of each study", "train_ids": sorted(set(train.study_ids.tolist())),
             "val_ids": sorted(set(held.study_ids.tolist())), "n_train_slices": len(train_idx),
             "n_val_slices": len(val_idx), "n_lesion_shapes": len(shapes)}
    logger.info("lesion model data: %d training slices, %d held out (superior slices of each of %s), %d real "
                "lesion shapes", len(train_idx), len(val_idx), split["train_ids"], len(shapes))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "data.yaml", yaml.safe_dump(split, sort_keys=False))
    seed_everything(cfg.seed)
    model = build_lesion_model(cfg.model_kwargs())

    def training_step(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lesion_loss(net(batch["image"]), batch["target"], batch["lung"])

    trainer = Trainer(
        model, run_dir, train_data=train_ds, training_step=training_step, loop=LoopConfig.of(cfg),
        validate=_validation(val_ds),
        optimizer_factory=lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        monitor=_MONITOR, mode="max", amp=False, config=cfg, epoch_callback=_sample_writer(val_ds),
        show_progress=show_progress,
    )

    def describe(fit: FitResult) -> ModelExport:
        val = fit.best_validation()
        config = {
            "name": f"covidctnet-lesion-unet2d-{cfg.size_xy}",
            "task": "lesion",
            "components": {LESION_COMPONENT: {"arch": "unet2d", "kwargs": cfg.model_kwargs()}},
            "preprocess": asdict(preprocess),
            "input": {"size_xy": cfg.size_xy, "channels": ["slice [0, 1]", "lung mask"]},
            "training": {"controls": [str(c) for c in controls], "command": command or "(library call)",
                         "seed": cfg.seed, "best_epoch": int(fit.best_epoch), "epochs_run": int(fit.epochs_run),
                         **split, "synthesis": asdict(cfg.synthesis)},
            "validation": val,
        }
        card = _model_card(cfg, split, val, fit.best_epoch, command or "(library call)")
        extra = {n: run_dir / n for n in ("metrics.csv", "loss_curve.png", "data.yaml") if (run_dir / n).is_file()}
        return ModelExport(config, card, {**extra, "training_config.yaml": run_dir / "config.yaml"})

    fit, md = trainer.run(describe, LESION_COMPONENT, resume=resume)
    val = fit.best_validation()
    if md is not None:
        logger.info("lesion model: best epoch %d, held-out Dice on synthetic lesions %.3f; model directory %s",
                    fit.best_epoch, val.get("val_dice", float("nan")), md.path)
    return RunResult(run_dir, md.path if md is not None else None, fit.best_epoch, fit.epochs_run, _MONITOR,
                     val if md is not None else {}, fit.history, {"data": split})


def _model_card(cfg: LesionModelConfig, split: dict[str, Any], val: dict[str, float], best_epoch: int,
                command: str) -> str:
    return f"""# Label-free lesion model (2D U-Net, {cfg.size_xy}×{cfg.size_xy})

Trained **only on control scans** ({', '.join(split['train_ids'])}) to
segment **synthetic** lesions inserted into their lungs (NormNet-style; {split['n_lesion_shapes']} real lesion shapes
from MosMed masks and random blobs, ground glass {cfg.synthesis.ggo_hu} HU and consolidation
{cfg.synthesis.consolidation_hu} HU). No labelled scan and no real lesion image was used.

* Best epoch {best_epoch}; held-out Dice on synthetic lesions {val.get('val_dice', float('nan')):.3f}. This says
  how well it finds *synthetic* lesions in the held-out controls, not how well it finds real ones: see
  `docs/validation.md` for figures on labelled scans.
* Input: the preprocessed slice (HU [-1000, 400] → [0, 1], {cfg.size_xy}×{cfg.size_xy}) and its lung mask; output:
  the lesion logit per pixel. Research use only; not a medical device.

Command: `{command}`
"""
