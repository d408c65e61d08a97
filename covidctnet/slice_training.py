"""The 2D branch: ``train-slice``, ``pretrain-slice`` and ``predict-slice`` on single CT slice images.

* :func:`train_slice` trains a MONAI 2D classifier (COVID-19 = class 1) on the ``train`` split of a UCSD or
  folder-per-class dataset through the shared :class:`~covidctnet.training.Trainer` (checkpoints, resume, DDP), selects
  the epoch on validation AUC, then writes the validation predictions, ROC and confusion PNGs and a model directory.
* :func:`pretrain_slice` pretrains the same network's encoder without labels, SimCLR-style (two augmented views per
  training image, NT-Xent loss), as a starting point for ``train-slice --init``.
* :func:`predict_slices` scores images with a model directory (the bundled one by default) into ``preds.csv``
  (``file, p_covid, predicted, status, error``), optionally with Grad-CAM PNGs; a bad image becomes an error row.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from covidctnet.errors import ConfigError, CovidCTNetError, InputError, ModelDirError
from covidctnet.utils import atomic_write_text, progress, resolve_device

__all__ = [
    "SliceTrainConfig",
    "PretrainSliceConfig",
    "DEFAULT_SLICE_MODEL",
    "train_slice",
    "pretrain_slice",
    "predict_slices",
    "load_slice_model",
    "predict_arrays",
    "slice_metrics",
    "nt_xent_loss",
    "PredictSummary",
]

logger = logging.getLogger(__name__)

DEFAULT_SLICE_MODEL = Path(__file__).resolve().parent / "assets" / "slice_model"
CLASS_NAMES_2 = ("noncovid", "covid")
Arch = Literal["densenet121", "densenet169", "resnet18", "resnet50"]


def _check_common(cfg: Any) -> None:
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
        lung_mask: add the classical lung mask (:mod:`covidctnet.lungmask2d`) as a second input channel.
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
        threshold: p(COVID) at or above which a slice is called COVID (also for validation accuracy and F1).
        seed: seed of weights, data order and augmentation.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: DataLoader worker processes (0 = in the main process).
        steps_per_epoch: cap on optimiser steps per epoch (null: one pass over the data).
        max_train_images: train on a stratified subset of this many images (quick runs; null: all).
        init: model directory whose encoder initialises the network (from ``pretrain-slice`` or ``train-slice``).
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
    threshold: float = 0.5
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    steps_per_epoch: int | None = None
    max_train_images: int | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), not {self.threshold}")
        if self.patience is not None and self.patience < 0:
            raise ConfigError(f"patience must be >= 0 or null, not {self.patience}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be in [0, lr], not {self.min_lr}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"ema must be in (0, 1) or null, not {self.ema}")


@dataclass(frozen=True)
class PretrainSliceConfig:
    """Options of ``covidctnet pretrain-slice`` (defaults = ``configs/pretrain_slice.yaml``).

    Attributes:
        arch, width, size, lung_mask: the network and input, as in ``train-slice`` (they must match there).
        epochs, batch_size, lr, weight_decay: Adam with cosine annealing; each batch holds ``batch_size`` images,
            i.e. ``2 * batch_size`` views, and every other view of the batch is a negative.
        temperature: NT-Xent temperature.
        proj_dim: output width of the projection MLP (dropped after pretraining).
        crop_scale, rotate_degrees, intensity, flip: augmentation of each view (stronger than for supervised
            training: contrastive learning needs views that differ).
        seed, device, workers, steps_per_epoch, max_train_images: as in ``train-slice``.
    """

    arch: Arch = "resnet18"
    width: float = 0.5
    size: int = 160
    lung_mask: bool = False
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.2
    proj_dim: int = 64
    crop_scale: float = 0.35
    rotate_degrees: float = 15.0
    flip: bool = True
    intensity: float = 0.2
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    steps_per_epoch: int | None = None
    max_train_images: int | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if not 0.01 <= self.temperature <= 10:
            raise ConfigError(f"temperature must be in [0.01, 10], not {self.temperature}")
        if self.proj_dim < 2:
            raise ConfigError(f"proj_dim must be >= 2, not {self.proj_dim}")


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


def _datasets(data: str | os.PathLike, cfg: Any, train_aug: bool, with_val: bool = True) -> tuple[Any, Any]:
    from covidctnet.data.ucsd import SliceDataset, build_slice_transforms, find_records

    train_records = _subset(find_records(data, "train"), cfg.max_train_images, cfg.seed)
    aug = build_slice_transforms(train_aug, cfg.size, cfg.lung_mask, cfg.crop_scale, cfg.rotate_degrees, cfg.flip,
                                 cfg.intensity)
    from covidctnet.training import distributed_context

    if distributed_context().is_main:  # one log line per run, not per torchrun process
        logger.info("%s: reading %d training images at %d px%s", data, len(train_records), cfg.size,
                    " with lung masks" if cfg.lung_mask else "")
    train = SliceDataset(train_records, cfg.size, cfg.lung_mask, aug, seed=cfg.seed)
    val = None
    if with_val:
        val_records = find_records(data, "val")
        val = SliceDataset(val_records, cfg.size, cfg.lung_mask, None, seed=cfg.seed)
        overlap = {r.path.resolve() for r in train_records} & {r.path.resolve() for r in val_records}
        if overlap:
            from covidctnet.errors import SplitError

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
    from sklearn.metrics import f1_score, roc_auc_score

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


@torch.no_grad()
def _predict_dataset(model: nn.Module, dataset: Any, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """(N, 2) softmax probabilities over a :class:`SliceDataset` in order (no augmentation)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
        out.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------------------------------------------------
# model directories


def _model_kwargs(cfg: Any) -> dict[str, Any]:
    kwargs = {"in_channels": 2 if cfg.lung_mask else 1, "num_classes": 2, "width": float(cfg.width)}
    if hasattr(cfg, "dropout"):
        kwargs["dropout"] = float(cfg.dropout)
    return kwargs


def _preprocessing(cfg: Any) -> dict[str, Any]:
    return {
        "size": int(cfg.size),
        "lung_mask": bool(cfg.lung_mask),
        "grey": "ITU-R 601 luma; alpha composited over black; 16-bit / 65535",
        "resize": "square, bilinear with anti-aliasing",
        "normalize": "per-image z-score of the slice channel",
    }


def load_slice_model(model_dir: str | os.PathLike | None = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a slice model directory (default: the bundled model) into an eval-mode network.

    A directory whose ``model`` component has ``members: N`` holds an ensemble
    (:class:`~covidctnet.models.slice.SliceEnsemble`, made by ``covidctnet ensemble-slice``).

    Returns:
        ``(model, config)``; ``config`` is the directory's ``config.yaml`` (``preprocessing``, ``threshold`` …).

    Raises:
        ModelDirError: not a slice model directory, missing bundled model, hash mismatch, or weights that do not fit.
    """
    from covidctnet.model_dir import load_model_dir
    from covidctnet.models.slice import SliceEnsemble, build_slice_model

    path = Path(model_dir) if model_dir is not None else DEFAULT_SLICE_MODEL
    if model_dir is None and not path.is_dir():
        raise ModelDirError(f"{path}: no bundled slice model in this installation; pass --model MODEL_DIR")
    md = load_model_dir(path)
    if md.config.get("task") != "slice" or "model" not in md.config.get("components", {}):
        raise ModelDirError(f"{path}: not a slice model directory (task {md.config.get('task')!r}; expected 'slice' "
                            "with a 'model' component)")
    comp = md.component("model")
    n_members = comp.get("members")
    try:
        if n_members is None:
            model = build_slice_model(comp["arch"], **comp.get("kwargs", {}))
        else:
            model = SliceEnsemble([build_slice_model(comp["arch"], **comp.get("kwargs", {})) for _ in range(n_members)])
    except (ConfigError, TypeError) as err:
        raise ModelDirError(f"{path}: cannot build {comp.get('arch')!r} from config.yaml: {err}") from err
    try:
        model.load_state_dict(md.state_dict("model"))
    except RuntimeError as err:
        raise ModelDirError(f"{path}: weights do not fit {comp['arch']}: {str(err).splitlines()[0]}") from err
    model.eval().to(resolve_device(device))
    config = dict(md.config)
    config["weights_sha256"] = md.weights_sha256("model")
    return model, config


def _init_from(model: nn.Module, init: str | os.PathLike, cfg: Any) -> None:
    """Load the encoder of a ``pretrain-slice`` (component ``encoder``) or ``train-slice`` (``model``) directory."""
    from covidctnet.model_dir import load_model_dir
    from covidctnet.models.slice import encoder_state_dict, load_encoder_state_dict

    md = load_model_dir(init)
    comps = md.config.get("components", {})
    name = "encoder" if "encoder" in comps else "model"
    comp = md.component(name)
    want = {"arch": cfg.arch, "in_channels": 2 if cfg.lung_mask else 1, "width": float(cfg.width)}
    have = {"arch": comp.get("arch"), "in_channels": comp.get("kwargs", {}).get("in_channels"),
            "width": float(comp.get("kwargs", {}).get("width", 1.0))}
    if want != have:
        raise ConfigError(f"--init {init}: encoder is {have}, this run needs {want}; use the same arch, width and "
                          "lung_mask as the pretraining")
    state = md.state_dict(name)  # a classifier's head keys are skipped by load_encoder_state_dict
    load_encoder_state_dict(model, state, str(init))
    logger.info("initialised the encoder from %s (%d tensors)", init, len(encoder_state_dict(model)))


def _metrics_row(split: str, m: dict[str, float]) -> str:
    return (f"| {split} | {int(m['n'])} | {100 * m['accuracy']:.1f}% | {100 * m['f1']:.1f} | {100 * m['auc']:.1f} | "
            f"{100 * m['sensitivity']:.1f}% | {100 * m['specificity']:.1f}% |")


def _card(cfg: SliceTrainConfig, data: str, command: str, metrics: dict[str, float], result: Any, n_train: int,
          n_val: int) -> str:
    return f"""# covidctnet slice model ({cfg.arch}, {cfg.size} px{', lung-mask channel' if cfg.lung_mask else ''})

COVID-19 vs non-COVID classifier for single chest CT slice images (PNG/JPG), output `p_covid` (class 1 = COVID-19).
Research software, **not a medical device**; not for diagnosis.

## Training data
- `{data}`: the UCSD COVID-CT dataset (Zhao et al., arXiv:2003.13865; images cut from figures of papers, copyrights
  with the papers' authors/publishers), official patient-level split: **train** split ({n_train} images) for
  training, **val** split ({n_val} images) for model selection only. The official test split was not available.
- Weights initialised {'from ' + str(cfg.init) if cfg.init else 'at random (no ImageNet weights could be downloaded)'}.

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
    from sklearn.metrics import roc_curve

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


def _write_val_outputs(run_dir: Path, dataset: Any, probs: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import confusion_matrix, roc_curve

    from covidctnet.plots import RocCurve, plot_confusion, plot_roc

    labels = dataset.labels
    p = probs[:, 1]
    metrics = slice_metrics(labels, p, threshold)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "p_covid", "predicted", "label"])
    for rec, pc in zip(dataset.records, p):
        writer.writerow([str(rec.path), f"{pc:.6f}", CLASS_NAMES_2[int(pc >= threshold)], CLASS_NAMES_2[rec.label]])
    atomic_write_text(run_dir / "val_preds.csv", buf.getvalue())
    atomic_write_text(run_dir / "val_metrics.json", json.dumps(metrics, indent=2) + "\n")
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, p, pos_label=1)
        plot_roc(run_dir / "roc.png", [RocCurve(fpr, tpr, "slice model", auc=metrics["auc"])],
                 title="ROC, validation split (COVID-19 positive)")
    cm = confusion_matrix(labels, (p >= threshold).astype(int), labels=[0, 1])
    plot_confusion(run_dir / "confusion.png", cm, CLASS_NAMES_2, title=f"Validation, threshold {threshold}")
    return metrics


def train_slice(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: SliceTrainConfig,
    resume: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
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
        ``{"best_epoch", "epochs_run", "val": {accuracy, f1, auc, ...}, "model_dir"}`` (rank 0; others get ``{}``).
    """
    from covidctnet.models.slice import build_slice_model
    from covidctnet.training import Trainer, seed_everything

    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    train, val = _datasets(data, cfg, train_aug=True)
    model = build_slice_model(cfg.arch, **_model_kwargs(cfg))
    if cfg.init and not resume:
        _init_from(model, cfg.init, cfg)
    device_holder: dict[str, torch.device] = {}

    def training_step(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return nn.functional.cross_entropy(net(batch["image"]), batch["label"])

    def validate(net: nn.Module) -> dict[str, float]:
        probs = _predict_dataset(net, val, device_holder["device"])
        m = slice_metrics(val.labels, probs[:, 1], cfg.threshold)
        eps = 1e-7
        loss = -np.mean(np.log(np.clip(probs[np.arange(len(probs)), val.labels], eps, 1.0)))
        return {"val_loss": float(loss), "val_auc": m["auc"], "val_acc": m["accuracy"], "val_f1": m["f1"]}

    trainer = Trainer(
        model,
        run_dir,
        train_data=train,
        training_step=training_step,
        validate=validate,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        scheduler_factory=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.epochs, eta_min=cfg.min_lr),
        monitor="val_auc",
        mode="max",
        max_epochs=cfg.epochs,
        patience=cfg.patience,
        batch_size=cfg.batch_size,
        sample_weights=train.class_balance_weights() if cfg.class_balance else None,
        steps_per_epoch=cfg.steps_per_epoch,
        num_workers=cfg.workers,
        device=cfg.device,
        ema_decay=cfg.ema,
        seed=cfg.seed,
        config=cfg,
    )
    device_holder["device"] = trainer.device
    try:
        result = trainer.fit(resume=resume)
        summary: dict[str, Any] = {}
        if trainer.ctx.is_main:
            best = build_slice_model(cfg.arch, **_model_kwargs(cfg))
            best.load_state_dict(trainer.best_state_dict())
            best.to(trainer.device)
            metrics = _write_val_outputs(run_dir, val, _predict_dataset(best, val, trainer.device), cfg.threshold)
            logger.info("best epoch %d: validation accuracy %.3f, F1 %.3f, AUC %.3f (n=%d)", result.best_epoch,
                        metrics["accuracy"], metrics["f1"], metrics["auc"], metrics["n"])
            config = {
                "name": f"covidctnet-slice-{cfg.arch}-{cfg.size}",
                "task": "slice",
                "classes": list(CLASS_NAMES_2),
                "positive_class": "covid",
                "threshold": float(cfg.threshold),
                "components": {"model": {"arch": cfg.arch, "kwargs": _model_kwargs(cfg)}},
                "preprocessing": _preprocessing(cfg),
                "training": {"data": str(data), "command": command or "", "best_epoch": int(result.best_epoch),
                             "epochs_run": int(result.epochs_run), "seed": int(cfg.seed)},
                "validation": {k: float(v) for k, v in metrics.items()},
            }
            card = _card(cfg, str(data), command or "(library call)", metrics, result, len(train), len(val))
            extra = {"training_config.yaml": run_dir / "config.yaml", "metrics.csv": run_dir / "metrics.csv"}
            trainer.export(run_dir / "model", config, card, "model", extra_files=extra)
            summary = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "val": metrics,
                       "model_dir": run_dir / "model"}
        else:
            trainer.export(run_dir / "model", {}, "", "model")  # joins the barrier only
        return summary
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------------------------------------
# pretrain-slice (SimCLR)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy (Chen et al., ICML 2020).

    Args:
        z1, z2: (B, D) projections of two views of the same B images (row i of each is a positive pair).
        temperature: softmax temperature.

    Returns:
        scalar loss: for each of the 2B views, cross-entropy of finding its partner among the other 2B-1 views.
    """
    z = nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return nn.functional.cross_entropy(sim, target)


class _SimCLR(nn.Module):
    def __init__(self, cfg: PretrainSliceConfig) -> None:
        from covidctnet.models.slice import build_slice_model, feature_dim, replace_head

        super().__init__()
        net = build_slice_model(cfg.arch, **_model_kwargs(cfg))
        dim = feature_dim(net)
        self.encoder = replace_head(net, nn.Identity())
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, cfg.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class _TwoViews(torch.utils.data.Dataset):
    """Two independently augmented views of each image (labels unused); view v of item i draws from (seed, e, i, v)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from covidctnet.training import derive_seed

        views = []
        for v in range(2):
            arr = self.base.cache[index]
            item = {"image": arr[:1]}
            if self.base.lung_mask:
                item["mask"] = arr[1:2]
            self.base.transform.set_random_state(seed=derive_seed(self.base.seed, self.base.epoch, index, v) % 2**32)
            views.append(self.base.transform(item)["image"].float())
        return {"view1": views[0], "view2": views[1]}


def pretrain_slice(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: PretrainSliceConfig,
    resume: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Contrastive (SimCLR) pretraining of the slice encoder on the training images, without their labels.

    Writes ``run_dir/checkpoints``, ``metrics.csv``, ``loss_curve.png`` and ``run_dir/encoder`` (a model directory
    with component ``encoder`` that ``train-slice --init`` reads). Selection is on the training NT-Xent loss (the
    validation images are not used at all).

    Returns:
        ``{"epochs_run", "final_loss", "encoder_dir"}`` on rank 0.
    """
    from covidctnet.training import Trainer, seed_everything

    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    train, _ = _datasets(data, cfg, train_aug=True, with_val=False)
    model = _SimCLR(cfg)

    def training_step(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch["view1"].shape[0]
        z = net(torch.cat([batch["view1"], batch["view2"]]))  # one pass: BatchNorm sees both views
        return nt_xent_loss(z[:n], z[n:], cfg.temperature)

    trainer = Trainer(
        model,
        run_dir,
        train_data=_TwoViews(train),
        training_step=training_step,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        scheduler_factory=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.epochs),
        monitor="train_loss",
        mode="min",
        max_epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        steps_per_epoch=cfg.steps_per_epoch,
        num_workers=cfg.workers,
        device=cfg.device,
        seed=cfg.seed,
        config=cfg,
    )
    try:
        result = trainer.fit(resume=resume)
        # the last epoch, not the lowest loss: a contrastive loss keeps falling and its minimum says little
        from covidctnet.model_dir import save_model_dir
        from covidctnet.training import load_checkpoint

        summary: dict[str, Any] = {}
        if trainer.ctx.is_main:
            state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
            encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
            config = {
                "name": f"covidctnet-slice-encoder-{cfg.arch}-{cfg.size}",
                "task": "slice-encoder",
                "components": {"encoder": {"arch": cfg.arch, "kwargs": _model_kwargs(cfg)}},
                "preprocessing": _preprocessing(cfg),
                "training": {"data": str(data), "command": command or "", "method": "SimCLR (NT-Xent)",
                             "epochs_run": int(result.epochs_run),
                             "final_loss": float(result.history[-1]["train_loss"])},
            }
            card = (f"# SimCLR slice encoder ({cfg.arch}, {cfg.size} px)\n\nContrastive pretraining on the training "
                    f"images of `{data}` without labels.\n\n```\n{command or '(library call)'}\n```\n\nUse with "
                    "`covidctnet train-slice --init THIS_DIR` (same arch, width and lung_mask). Not a classifier.\n")
            save_model_dir(run_dir / "encoder", config, {"encoder": encoder}, card,
                           {"training_config.yaml": run_dir / "config.yaml", "metrics.csv": run_dir / "metrics.csv"})
            summary = {"epochs_run": result.epochs_run, "final_loss": result.history[-1]["train_loss"],
                       "encoder_dir": run_dir / "encoder"}
        return summary
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------------------------------------
# predict-slice


@dataclass
class PredictSummary:
    """What :func:`predict_slices` did: rows written, failures, CAM files."""

    out_csv: Path
    n_ok: int
    n_failed: int
    cams: list[Path]


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    from covidctnet.data.ucsd import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                logger.warning("%s: no images (%s) in this folder", path, ", ".join(IMAGE_SUFFIXES))
            files.extend(found)
        else:
            files.append(path)  # a missing or non-image file becomes an error row, not an abort
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def predict_arrays(model: nn.Module, config: dict, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """p(COVID) of grey-scale images ((H, W) float in [0, 1]) with a loaded slice model; returns (N,) float."""
    from covidctnet.data.ucsd import build_slice_transforms, prepare_slice

    pre = config["preprocessing"]
    transform = build_slice_transforms(False, pre["size"], pre["lung_mask"])
    # an ONNX model (covidctnet.onnx_export.OnnxModule) has no parameters and runs on the CPU
    device = next(model.parameters(), torch.empty(0)).device
    xs = []
    for arr in arrays:
        prepared = prepare_slice(arr, pre["size"], pre["lung_mask"])
        item = {"image": prepared[:1], **({"mask": prepared[1:2]} if pre["lung_mask"] else {})}
        xs.append(transform(item)["image"].float())
    with torch.no_grad():
        logits = model(torch.stack(xs).to(device))
    return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()


def _cam_layers(model: nn.Module) -> list[str]:
    """The last feature layer of the network, or of every member of an ensemble."""
    members = getattr(model, "members", None)
    nets = [(f"members.{i}.", m) for i, m in enumerate(members)] if members is not None else [("", model)]
    return [prefix + ("layer4" if hasattr(m, "layer4") else "class_layers.relu") for prefix, m in nets]


def _write_cam(path: Path, image: np.ndarray, cam: np.ndarray, p_covid: float, name: str) -> Path:
    from covidctnet.plots import new_figure, save_figure

    fig = new_figure((8.0, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.imshow(image, cmap="gray")
    ax1.set_title(name[:40], fontsize=8)
    ax2.imshow(image, cmap="gray")
    heat = ax2.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax2.set_title(f"Grad-CAM for COVID-19 (p = {p_covid:.3f})", fontsize=8)
    for ax in (ax1, ax2):
        ax.axis("off")
    fig.colorbar(heat, ax=ax2, fraction=0.046, pad=0.04)
    return save_figure(fig, path, dpi=100)


def predict_slices(
    inputs: Sequence[str | os.PathLike],
    out_csv: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    cam_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    threshold: float | None = None,
    backend: str = "torch",
    on_error: Callable[[str], None] | None = None,
) -> PredictSummary:
    """Score slice images into ``preds.csv``; a bad image is an error row and the others go on.

    As for the batch commands, nothing is written when every image failed.

    Args:
        inputs: image files and/or folders (searched recursively for images).
        out_csv: output CSV ``file, p_covid, predicted, status, error`` (``predicted`` in {covid, noncovid};
            ``status`` ok / error), written atomically once all images are done.
        model_dir: a slice model directory; ``None`` = the bundled model.
        cam_dir: write ``<stem>_cam.png`` Grad-CAM overlays (class COVID-19) here.
        device: ``auto`` / ``cpu`` / ``cuda``.
        batch_size: images per forward pass.
        threshold: override of the model's decision threshold on ``p_covid``.
        backend: ``torch``, or ``onnx`` (onnxruntime on the CPU; ``model_dir`` is an ``export-onnx`` output).
        on_error: called with each bad image's one-line message as it happens (the CLI prints ``Error: ...``);
            ``None`` logs it.

    Raises:
        InputError: no input images at all.
        ModelDirError: the model directory is unusable.
        ConfigError: unknown backend, or Grad-CAM asked of the ONNX backend (it needs PyTorch's gradients).
    """
    from covidctnet.data.ucsd import load_grey

    files = _expand_inputs(inputs)
    if not files:
        raise InputError(f"{', '.join(map(str, inputs))}: no images to predict")
    if backend == "onnx":
        if cam_dir is not None:
            raise ConfigError("--cam needs gradients, which the onnx backend has not; use --backend torch for Grad-CAM")
        if model_dir is None:
            raise ConfigError("--backend onnx needs --model: an `export-onnx` output folder of a slice model")
        from covidctnet.onnx_export import load_onnx_component, load_onnx_manifest

        md, manifest = load_onnx_manifest(model_dir)
        model, config = load_onnx_component(md, manifest, "model"), dict(md.config)
    elif backend == "torch":
        model, config = load_slice_model(model_dir, device)
    else:
        raise ConfigError(f"'backend' must be one of ['torch', 'onnx'], not {backend!r}")
    thr = float(config.get("threshold", 0.5) if threshold is None else threshold)
    rows: list[list[str]] = []
    cams: list[Path] = []
    gradcam = None
    if cam_dir is not None:
        from monai.visualize import GradCAM

        gradcam = GradCAM(nn_module=model, target_layers=_cam_layers(model))
        Path(cam_dir).mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()
    n_failed = 0
    for start in progress(range(0, len(files), batch_size), total=math.ceil(len(files) / batch_size),
                          desc="predict-slice"):
        chunk = files[start : start + batch_size]
        arrays: list[np.ndarray | None] = []
        errors: list[str] = []
        for f in chunk:
            try:
                arrays.append(load_grey(f))
                errors.append("")
            except CovidCTNetError as err:
                arrays.append(None)
                errors.append(str(err))
        good = [a for a in arrays if a is not None]
        probs = iter(predict_arrays(model, config, good).tolist()) if good else iter(())
        for f, arr, err in zip(chunk, arrays, errors):
            if arr is None:
                n_failed += 1
                (on_error or logger.error)(err)
                rows.append([str(f), "", "", "error", err])
                continue
            p = float(next(probs))
            rows.append([str(f), f"{p:.6f}", CLASS_NAMES_2[int(p >= thr)], "ok", ""])
            if gradcam is not None:
                assert cam_dir is not None
                cams.append(_cam_for(gradcam, model, config, arr, p, f, Path(cam_dir), used_names))
    if n_failed == len(rows):
        return PredictSummary(Path(out_csv), 0, n_failed, cams)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "p_covid", "predicted", "status", "error"])
    writer.writerows(rows)
    atomic_write_text(out_csv, buf.getvalue())
    logger.info("%s: %d image(s) scored, %d failed (model %s)", out_csv, len(rows) - n_failed, n_failed,
                config.get("name"))
    return PredictSummary(Path(out_csv), len(rows) - n_failed, n_failed, cams)


def _cam_for(gradcam: Any, model: nn.Module, config: dict, arr: np.ndarray, p: float, f: Path, cam_dir: Path,
             used: set[str]) -> Path:
    from covidctnet.data.ucsd import build_slice_transforms, prepare_slice

    pre = config["preprocessing"]
    prepared = prepare_slice(arr, pre["size"], pre["lung_mask"])
    item = {"image": prepared[:1], **({"mask": prepared[1:2]} if pre["lung_mask"] else {})}
    x = build_slice_transforms(False, pre["size"], pre["lung_mask"])(item)["image"].float()[None]
    x = x.to(next(model.parameters()).device)
    with torch.enable_grad():  # an ensemble: the mean of its members' maps, each for the ensemble's COVID output
        n_layers = len(_cam_layers(model))
        cam = np.mean([gradcam(x, class_idx=1, layer_idx=i)[0, 0].detach().cpu().numpy() for i in range(n_layers)],
                      axis=0)
    stem = f.stem
    name, k = f"{stem}_cam.png", 1
    while name in used:  # same stem in two folders
        k += 1
        name = f"{stem}_{k}_cam.png"
    used.add(name)
    return _write_cam(cam_dir / name, prepared[0], cam, p, f.name)

