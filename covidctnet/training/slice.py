"""``covidctnet train-slice``: the 2D branch's supervised training on single CT slice images.

:func:`train_slice` trains a MONAI 2D classifier (COVID-19 = class 1) on the ``train`` split of a UCSD or
folder-per-class dataset through the shared :class:`~covidctnet.training.trainer.Trainer` (checkpoints, resume, DDP),
selects the epoch on validation AUC, then writes the validation predictions, ROC and confusion PNGs and a model
directory. Self-supervised pretraining is in :mod:`covidctnet.training.simclr`, prediction in
:mod:`covidctnet.inference.predict_slice`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve
from torch import nn

from covidctnet.core.errors import ConfigError, SplitError
from covidctnet.core.files import atomic_write_text, write_csv
from covidctnet.core.labels import BINARY_CLASS_NAMES
from covidctnet.core.model_dir import load_model_dir
from covidctnet.core.seeding import seed_everything
from covidctnet.data.ucsd import (
    SliceDataset,
    build_slice_transforms,
    find_records,
)
from covidctnet.evaluation.plots import RocCurve, plot_confusion, plot_roc
from covidctnet.models.grad_cam import CamScale, CamScaleConfig, cam_maps, cam_scale_of
from covidctnet.models.pretrained import IMAGENET, init_slice_model
from covidctnet.models.slice import (
    build_slice_model,
    encoder_state_dict,
    load_encoder_state_dict,
)
from covidctnet.training.trainer import (
    FitResult,
    LoopConfig,
    ModelExport,
    RunResult,
    Trainer,
    distributed_context,
    predict_dataset,
)

__all__ = [
    "init_slice_weights",
    "SliceTrainConfig",
    "Arch",
    "check_common_settings",
    "train_slice",
    "slice_training_step",
    "slice_metrics",
    "youden_threshold",
    "slice_datasets",
    "slice_model_kwargs",
    "slice_preprocessing",
    "slice_model_config",
    "write_slice_val_outputs",
    "dataset_cam_maps",
    "dataset_cam_scale",
    "recorded_cam_scale",
]

logger = logging.getLogger(__name__)

Arch = Literal["densenet121", "densenet169", "resnet18", "resnet50"]


def check_common_settings(cfg: Any) -> None:
    """Range checks shared by the train-slice and pretrain-slice configs (size, epochs, batch, lr, augmentation)."""
    if cfg.size < 32 or cfg.size > 1024:
        raise ConfigError(f"size must be in [32, 1024] pixels, not {cfg.size}")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ConfigError(f"epochs must be >= 1 and batch_size >= 2, not {cfg.epochs} and {cfg.batch_size}")
    if cfg.lr <= 0 or cfg.weight_decay < 0:
        raise ConfigError(f"lr must be > 0 and weight_decay >= 0, not {cfg.lr} and {cfg.weight_decay}")
    if not 0.1 <= cfg.crop_scale <= 1.0:
        raise ConfigError(f"crop_scale must be in [0.1, 1], not {cfg.crop_scale}")
    if not 0 <= cfg.rotate_degrees <= 45:
        raise ConfigError(f"rotate_degrees must be in [0, 45], not {cfg.rotate_degrees}")
    if not 0 <= cfg.intensity <= 0.3:
        raise ConfigError(f"intensity must be in [0, 0.3], not {cfg.intensity}")
    if cfg.workers < 0:
        raise ConfigError(f"workers must be >= 0, not {cfg.workers}")
    for key in ("steps_per_epoch", "max_train_images"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 or null, not {value}")


@dataclass(frozen=True)
class SliceTrainConfig:
    """Options of ``covidctnet train-slice`` (defaults = ``configs/slice.yaml``).

    Attributes:
        arch: MONAI 2D network (``densenet121``, ``densenet169``, ``resnet18``, ``resnet50``).
        width: ResNet channel multiplier (0.5 = half width; DenseNets: 1.0 only).
        dropout: DenseNet dropout before the classifier.
        size: square input size in pixels (the paper used 480; smaller for CPU).
        lung_mask: add the classical lung mask (:mod:`covidctnet.preprocessing.lungmask2d`) as a second input channel.
        epochs: training epochs; also the cosine-annealing period.
        batch_size: images per optimiser step (per process under DDP).
        lr, weight_decay, min_lr: Adam learning rate, L2 weight decay, final learning rate of the cosine schedule.
        class_balance: draw both classes equally often (sampling with replacement, weights 1 / class count).
        patience: early stop after this many epochs without a better validation AUC (null: never).
        ema: decay of an exponential moving average of the weights (per step; 0.99 ~ the last 100 steps) that is
            validated, selected and exported instead of the raw weights (null: off).
        crop_scale: smallest side of the random resized crop, as a fraction of the image side.
        rotate_degrees: largest random rotation (degrees, either way).
        flip: random left-right flips.
        intensity: strength of the intensity jitter (scale and shift ±intensity, gamma 1-2i .. 1+2.5i).
        source_aug: also change what differs between the papers the images come from (display window, borders and
            aspect, JPEG artefacts, arrows and text: :func:`~covidctnet.data.ucsd.source_augment`).
        threshold: p(COVID) at or above which a slice is called COVID (also for validation accuracy and F1).
        seed: seed of weights, data order and augmentation.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: DataLoader worker processes (0 = in the main process).
        steps_per_epoch: cap on optimiser steps per epoch (null: one pass over the data).
        max_train_images: train on a stratified subset of this many images (quick runs; null: all).
        init: what starts the network: ``imagenet`` (torchvision's ImageNet weights, from torchvision's cache or
            downloaded there), a torchvision/timm state-dict file (both: :mod:`covidctnet.models.pretrained`; ResNets
            then take torchvision's layout and need width 1.0), or a model directory whose encoder is loaded (from
            ``pretrain-slice`` or ``train-slice``).
    """

    arch: Arch = "resnet18"
    width: float = 0.5
    dropout: float = 0.0
    size: int = 160
    lung_mask: bool = False
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    min_lr: float = 1e-6
    class_balance: bool = True
    patience: int | None = None
    ema: float | None = None
    crop_scale: float = 0.6
    rotate_degrees: float = 10.0
    flip: bool = True
    intensity: float = 0.1
    source_aug: bool = False
    threshold: float = 0.5
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    steps_per_epoch: int | None = None
    max_train_images: int | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        check_common_settings(self)
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), not {self.threshold}")
        if self.patience is not None and self.patience < 0:
            raise ConfigError(f"patience must be >= 0 or null, not {self.patience}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be in [0, lr], not {self.min_lr}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"ema must be in (0, 1) or null, not {self.ema}")
        if torchvision_init(self.init) and self.arch.startswith("resnet") and self.width != 1.0:
            raise ConfigError(f"init {self.init}: torchvision's {self.arch} is full width; set width 1.0 "
                              f"(--width 1), not {self.width}")


def torchvision_init(init: str | os.PathLike | None) -> bool:
    """Whether ``init`` names torchvision-style weights (``imagenet`` or a file), not a model directory."""
    return init is not None and (str(init) == IMAGENET or Path(init).is_file())


# --------------------------------------------------------------------------------------------------------------------
# data


def _subset(records: list[Any], n: int | None, seed: int) -> list[Any]:
    """A stratified random subset of ``n`` records (all when ``n`` is None or too large)."""
    if n is None or n >= len(records):
        return records
    rng = np.random.default_rng(seed)
    labels = np.array([r.label for r in records])
    chosen: list[int] = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        k = max(1, round(n * len(idx) / len(records)))
        chosen.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    return [records[i] for i in sorted(chosen)]


def slice_datasets(data: str | os.PathLike, cfg: Any, train_aug: bool, with_val: bool = True) -> tuple[Any, Any]:
    train_records = _subset(find_records(data, "train"), cfg.max_train_images, cfg.seed)
    aug = build_slice_transforms(train_aug, cfg.size, cfg.lung_mask, cfg.crop_scale, cfg.rotate_degrees, cfg.flip,
                                 cfg.intensity)

    if distributed_context().is_main:  # one log line per run, not per torchrun process
        logger.info("%s: reading %d training images at %d px%s", data, len(train_records), cfg.size,
                    " with lung masks" if cfg.lung_mask else "")
    train = SliceDataset(train_records, cfg.size, cfg.lung_mask, aug, seed=cfg.seed,
                         source_aug=bool(getattr(cfg, "source_aug", False)))
    val = None
    if with_val:
        val_records = find_records(data, "val")
        val = SliceDataset(val_records, cfg.size, cfg.lung_mask, None, seed=cfg.seed)
        overlap = {r.path.resolve() for r in train_records} & {r.path.resolve() for r in val_records}
        if overlap:
            raise SplitError(f"{data}: {len(overlap)} image(s) are in both train and val, e.g. {sorted(overlap)[0]}")
    return train, val


# --------------------------------------------------------------------------------------------------------------------
# metrics


def slice_metrics(labels: np.ndarray, p_covid: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, F1 (COVID positive), AUC, sensitivity and specificity of COVID probabilities.

    Args:
        labels: (N,) 1 = COVID, 0 = non-COVID.
        p_covid: (N,) probabilities.
        threshold: COVID when ``p_covid >= threshold``.

    Returns:
        ``{"accuracy", "f1", "auc", "sensitivity", "specificity", "n"}``; AUC is NaN with a single class.
    """
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(p_covid) >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    pos, neg = labels == 1, labels == 0
    return {
        "accuracy": float((pred == labels).mean()),
        "f1": float(f1_score(labels, pred, pos_label=1, zero_division=0)),
        "auc": float(roc_auc_score(labels, p_covid)) if both else float("nan"),
        "sensitivity": float(pred[pos].mean()) if pos.any() else float("nan"),
        "specificity": float(1 - pred[neg].mean()) if neg.any() else float("nan"),
        "n": float(len(labels)),
    }


def dataset_cam_maps(model: nn.Module, dataset: Any, device: torch.device | str = "cpu") -> np.ndarray:
    """(N, S, S) Grad-CAM maps of the log-odds of COVID-19 (:func:`~covidctnet.models.grad_cam.log_odds_cam`) of a
    :class:`SliceDataset` in order (no augmentation); the model is left on ``device``."""
    return cam_maps(model.to(device), [dataset[i]["image"] for i in range(len(dataset))])


def dataset_cam_scale(model: nn.Module, dataset: Any, images: str, data: str, device: torch.device | str = "cpu",
                      cfg: CamScaleConfig | None = None) -> CamScale:
    """The Grad-CAM colour scale of a slice model from its maps over the images it was validated on.

    Args:
        model: the slice model or ensemble.
        dataset: those images (:class:`SliceDataset` without augmentation).
        images: which images they are, for the record (``validation split`` …).
        data: the dataset's name and split, without a path (``covid-ct-2d val``).
        device: where to compute the maps.
        cfg: percentile and ``show_from`` (default :class:`~covidctnet.models.grad_cam.CamScaleConfig`).
    """
    return cam_scale_of(dataset_cam_maps(model, dataset, device), images, data, cfg)


def recorded_cam_scale(compute: Callable[[], CamScale]) -> dict[str, Any] | None:
    """``compute()``'s scale as the ``cam_scale`` mapping of a model directory's ``config.yaml``, or ``None`` with a
    warning where the model's maps are zero at the percentile (a barely trained model): training still writes its
    model directory, and ``predict-slice --cam`` then takes a scale from each run's images."""
    try:
        return compute().to_dict()
    except ConfigError as err:
        logger.warning("%s; no Grad-CAM colour scale recorded", err)
        return None


# --------------------------------------------------------------------------------------------------------------------
# model directories


def slice_model_kwargs(cfg: Any) -> dict[str, Any]:
    # DenseNets have no width: the ResNet default (0.5) must not make `--arch densenet169` fail
    width = float(cfg.width) if cfg.arch.startswith("resnet") else 1.0
    kwargs = {"in_channels": 2 if cfg.lung_mask else 1, "num_classes": 2, "width": width}
    if hasattr(cfg, "dropout"):
        kwargs["dropout"] = float(cfg.dropout)
    if torchvision_init(getattr(cfg, "init", None)):
        kwargs["layout"] = "torchvision"  # the ResNet stem and shortcuts of torchvision's weights
    return kwargs


def slice_preprocessing(cfg: Any) -> dict[str, Any]:
    return {
        "size": int(cfg.size),
        "lung_mask": bool(cfg.lung_mask),
        "grey": "ITU-R 601 luma; alpha composited over black; 16-bit / 65535",
        "resize": "square, bilinear with anti-aliasing",
        "normalize": "per-image z-score of the slice channel",
    }


def init_slice_weights(model: nn.Module, init: str | os.PathLike, cfg: Any) -> dict[str, Any]:
    """Load ImageNet or torchvision/timm weights, or the encoder of a ``pretrain-slice`` (component ``encoder``) or
    ``train-slice`` (``model``) directory; return what to record in the model directory."""
    if torchvision_init(init):
        return init_slice_model(model, cfg.arch, init)
    md = load_model_dir(init)
    comps = md.config.get("components", {})
    name = "encoder" if "encoder" in comps else "model"
    comp = md.component(name)
    want = {"arch": cfg.arch, "in_channels": 2 if cfg.lung_mask else 1, "width": slice_model_kwargs(cfg)["width"]}
    have = {"arch": comp.get("arch"), "in_channels": comp.get("kwargs", {}).get("in_channels"),
            "width": float(comp.get("kwargs", {}).get("width", 1.0))}
    if want != have:
        raise ConfigError(f"--init {init}: encoder is {have}, this run needs {want}; use the same arch, width and "
                          "lung_mask as the pretraining")
    state = md.state_dict(name)  # a classifier's head keys are skipped by load_encoder_state_dict
    load_encoder_state_dict(model, state, str(init))
    logger.info("initialised the encoder from %s (%d tensors)", init, len(encoder_state_dict(model)))
    return {"source": "model_dir", "file": str(init), "sha256": md.weights_sha256(name)}


def _metrics_row(split: str, m: dict[str, float]) -> str:
    return (f"| {split} | {int(m['n'])} | {100 * m['accuracy']:.1f}% | {100 * m['f1']:.1f} | {100 * m['auc']:.1f} | "
            f"{100 * m['sensitivity']:.1f}% | {100 * m['specificity']:.1f}% |")


def _init_text(init: str | None) -> str:
    if init == IMAGENET:
        return "from torchvision's ImageNet weights (RGB stem kernels summed into the grey channel)"
    return f"from `{init}`" if init else "at random"


def _card(cfg: SliceTrainConfig, data: str, command: str, metrics: dict[str, float], result: Any, n_train: int,
          n_val: int) -> str:
    return f"""# covidctnet slice model ({cfg.arch}, {cfg.size} px{', lung-mask channel' if cfg.lung_mask else ''})

COVID-19 vs non-COVID classifier for single chest CT slice images (PNG/JPG), output `p_covid` (class 1 = COVID-19).
Research software, **not a medical device**; not for diagnosis.

## Training data
- `{data}`: the UCSD COVID-CT dataset (Zhao et al., arXiv:2003.13865; images cut from figures of papers, copyrights
  with the papers' authors/publishers), official patient-level split: **train** split ({n_train} images) for
  training, **val** split ({n_val} images) for model selection only. The official test split was not available.
- Weights initialised {_init_text(cfg.init)}.

## Command
```
{command}
```
Config: `training_config.yaml` in this folder. {result.epochs_run} epochs run, best epoch {result.best_epoch}
(highest validation AUC).

## Validation figures (used for model selection: optimistic, not a test result)
| split | n | accuracy | F1 (COVID) | AUC | sensitivity | specificity |
|---|---|---|---|---|---|---|
{_metrics_row("val", metrics)}

Threshold: COVID when `p_covid >= {cfg.threshold}`. For comparison, the paper's ImageNet-pretrained DenseNet-169
baseline reached 79.5% accuracy, F1 76.0, AUC 90.1 on the official **test** split (not the same images).

## Intended use and limits
Scoring slice images like those of the UCSD dataset for research and teaching. The images are figures from papers
(varying windows, sizes, annotations), so scores on raw DICOM slices or other sources are not validated. Validation
metrics come from {n_val} images and have wide confidence intervals.
"""


def youden_threshold(labels: np.ndarray, p_covid: np.ndarray) -> float:
    """The decision threshold that maximises Youden's J (sensitivity + specificity - 1) on labelled scores.

    Slice models trained on a few hundred images are often miscalibrated in a direction that changes from seed to seed
    (at 0.5 one is sensitive and unspecific, the next the reverse), so a threshold chosen on held-out images can beat
    0.5. It is chosen on those images, so figures computed on them at this threshold are optimistic.

    Args:
        labels: (N,) 1 = COVID, 0 = non-COVID; both classes present.
        p_covid: (N,) probabilities.

    Returns:
        The midpoint between the lowest score called COVID at the best J and the next lower score, so that no image
        sits on the threshold (``p_covid >= threshold`` reproduces the optimum). Among equal J, the highest threshold.

    Raises:
        ConfigError: a single class.
    """
    labels, p = np.asarray(labels).astype(int), np.asarray(p_covid, dtype=float)
    if len(np.unique(labels)) != 2:
        raise ConfigError("a threshold by Youden's J needs both classes among the labelled images")
    fpr, tpr, thresholds = roc_curve(labels, p, pos_label=1, drop_intermediate=False)
    best = int(np.argmax(np.round(tpr - fpr, 12)))  # first = highest threshold among ties (rounded: 1-1/3 > 2/3)
    cut = float(min(thresholds[best], 1.0))
    lower = p[p < cut]
    return float((cut + lower.max()) / 2) if lower.size else cut


# --------------------------------------------------------------------------------------------------------------------
# train-slice


def write_slice_val_outputs(run_dir: Path, dataset: Any, probs: np.ndarray, threshold: float) -> dict[str, float]:
    labels = dataset.labels
    p = probs[:, 1]
    metrics = slice_metrics(labels, p, threshold)
    write_csv(run_dir / "val_preds.csv", ["file", "p_covid", "predicted", "label"],
              ([str(rec.path), f"{pc:.6f}", BINARY_CLASS_NAMES[int(pc >= threshold)], BINARY_CLASS_NAMES[rec.label]]
               for rec, pc in zip(dataset.records, p)))
    atomic_write_text(run_dir / "val_metrics.json", json.dumps(metrics, indent=2) + "\n")
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, p, pos_label=1)
        plot_roc(run_dir / "roc.png", [RocCurve(fpr, tpr, "slice model", auc=metrics["auc"])],
                 title="ROC, validation split (COVID-19 positive)")
    cm = confusion_matrix(labels, (p >= threshold).astype(int), labels=[0, 1])
    plot_confusion(run_dir / "confusion.png", cm, BINARY_CLASS_NAMES, title=f"Validation, threshold {threshold}")
    return metrics


def slice_model_config(cfg: SliceTrainConfig, name: str) -> dict[str, Any]:
    """The ``config.yaml`` keys every trained slice model directory shares: name, task, classes, threshold, network
    and the preprocessing it expects (callers add ``training`` and their figures)."""
    return {
        "name": name,
        "task": "slice",
        "class_names": list(BINARY_CLASS_NAMES),
        "positive_class": "covid",
        "threshold": float(cfg.threshold),
        "components": {"model": {"arch": cfg.arch, "kwargs": slice_model_kwargs(cfg)}},
        "preprocess": slice_preprocessing(cfg),
    }


def slice_training_step(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The slice models' loss: cross-entropy of the logits of ``batch["image"]`` (B, C, S, S) against
    ``batch["label"]`` (B,) class indices."""
    return nn.functional.cross_entropy(net(batch["image"]), batch["label"])


def train_slice(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: SliceTrainConfig,
    resume: bool = False,
    command: str | None = None,
) -> RunResult:
    """Train the slice classifier; select the epoch on validation AUC; write plots and a model directory.

    Args:
        data: UCSD (``CT_COVID/``, ``CT_NonCOVID/``, ``Data-split/``) or ``<split>/<class>/`` folder with ``train``
            and ``val`` splits.
        run_dir: output: ``checkpoints/``, ``metrics.csv``, ``loss_curve.png``, ``config.yaml``, and after training
            ``val_preds.csv``, ``val_metrics.json``, ``roc.png``, ``confusion.png`` and ``model/`` (model directory).
        cfg: the resolved config.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        command: the command line, recorded in the model card.

    Returns:
        :class:`~covidctnet.training.trainer.RunResult`; ``val`` holds the exported epoch's accuracy, F1, AUC ….
    """
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    model = build_slice_model(cfg.arch, **slice_model_kwargs(cfg))
    # before the data load, so that a bad --init fails at once
    init_info = init_slice_weights(model, cfg.init, cfg) if cfg.init and not resume else None
    train, val = slice_datasets(data, cfg, train_aug=True)

    def validate(net: nn.Module, device: torch.device) -> dict[str, float]:
        probs = predict_dataset(net, val, device)
        m = slice_metrics(val.labels, probs[:, 1], cfg.threshold)
        eps = 1e-7
        loss = -np.mean(np.log(np.clip(probs[np.arange(len(probs)), val.labels], eps, 1.0)))
        return {"val_loss": float(loss), "val_auc": m["auc"], "val_acc": m["accuracy"], "val_f1": m["f1"]}

    trainer = Trainer(
        model,
        run_dir,
        train_data=train,
        training_step=slice_training_step,
        loop=LoopConfig.of(cfg),
        validate=validate,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        scheduler_factory=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.epochs, eta_min=cfg.min_lr),
        monitor="val_auc",
        mode="max",
        sample_weights=train.class_balance_weights() if cfg.class_balance else None,
        ema_decay=cfg.ema,
        config=cfg,
    )
    metrics: dict[str, float] = {}

    def describe(result: FitResult) -> ModelExport:
        best = build_slice_model(cfg.arch, **slice_model_kwargs(cfg))
        best.load_state_dict(trainer.best_state_dict())
        best.to(trainer.device)
        probs = predict_dataset(best, val, trainer.device)
        metrics.update(write_slice_val_outputs(run_dir, val, probs, cfg.threshold))
        logger.info("best epoch %d: validation accuracy %.3f, F1 %.3f, AUC %.3f (n=%d)", result.best_epoch,
                    metrics["accuracy"], metrics["f1"], metrics["auc"], metrics["n"])
        config = {
            **slice_model_config(cfg, f"covidctnet-slice-{cfg.arch}-{cfg.size}"),
            "training": {"data": str(data), "command": command or "", "best_epoch": int(result.best_epoch),
                         "epochs_run": int(result.epochs_run), "seed": int(cfg.seed),
                         "init": init_info or ({"source": str(cfg.init)} if cfg.init else None)},
            "validation": {k: float(v) for k, v in metrics.items()},
        }
        # the colour range of predict-slice --cam, from the images that chose this epoch
        scale = recorded_cam_scale(lambda: dataset_cam_scale(best, val, "validation split",
                                                             f"{Path(data).name} val", trainer.device))
        if scale is not None:
            config["cam_scale"] = scale
        card = _card(cfg, str(data), command or "(library call)", metrics, result, len(train), len(val))
        extra = {"training_config.yaml": run_dir / "config.yaml", "metrics.csv": run_dir / "metrics.csv"}
        return ModelExport(config, card, extra)

    result, md = trainer.run(describe, "model", resume=resume)
    return RunResult(run_dir, md.path if md is not None else None, result.best_epoch, result.epochs_run,
                     "val_auc", metrics, list(result.history))


# --------------------------------------------------------------------------------------------------------------------
# pretrain-slice (SimCLR)


# --------------------------------------------------------------------------------------------------------------------
# predict-slice


