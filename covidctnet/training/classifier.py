"""``covidctnet train-classifier``: the 3D CNN on residual volumes (control / COVID-19 / CAP).

:func:`train_classifier` pairs the residual volumes of a ``covidctnet residuals`` folder with a labels CSV, splits them
by patient (from a seed, stratified where possible, or from a split file), and trains a classifier from
:func:`covidctnet.models.cnn3d.build_classifier` through the shared :class:`~covidctnet.training.trainer.Trainer`
(checkpoints, exact resume, early stopping, ``torchrun`` DDP) with a class-weighted cross-entropy, Adam (official
CovidCTNet: lr 1e-4) and MONAI 3D augmentation of the training volumes only.

Model selection and early stopping use the **validation** macro one-vs-rest AUC over the classes present in the
validation set. When the validation set holds a single class the AUC is undefined; the run then selects on the
validation loss and says so in the log, the model card and ``val_metrics.json``.

Outputs in ``RUN_DIR``: ``split.csv``, ``config.yaml``, ``checkpoints/``, ``metrics.csv``, ``loss_curve.png``, and after
training ``val_preds.csv``, ``val_metrics.json``, ``roc.png`` (needs two classes in val), ``confusion.png`` and
``model/`` (a model directory with component ``classifier``; load it with
:func:`covidctnet.models.registry.load_classifier`).

When ``RESIDUALS/residuals.yaml`` names the denoiser that made the residuals and that model directory still holds the
same weights (same sha256), the denoiser and its ``preprocess`` config are bundled into ``model/`` as well, so
``covidctnet predict --model RUN_DIR/model`` runs the whole chain; otherwise ``model/`` holds the classifier alone and
its model card says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from torch import nn

from covidctnet.core.errors import CheckpointError, ConfigError, CovidCTNetError, SplitError
from covidctnet.core.files import atomic_write_text, to_jsonable, write_csv
from covidctnet.core.labels import CLASS_NAMES
from covidctnet.core.model_dir import load_model_dir
from covidctnet.core.seeding import seed_everything
from covidctnet.data.residual_volumes import (
    ResidualVolumeDataset,
    apply_split_file,
    build_augmentation,
    build_records,
    split_patients,
    write_split_csv,
)
from covidctnet.evaluation.plots import RocCurve, plot_confusion, plot_roc
from covidctnet.models.cnn3d import build_classifier
from covidctnet.models.pretrained import MEDICALNET_ARCHS, load_medicalnet_weights, medicalnet_resnet_kwargs
from covidctnet.models.registry import LESION_COMPONENT, resolve_denoiser_dir
from covidctnet.training.trainer import (
    LoopConfig,
    ModelExport,
    RunResult,
    Trainer,
    distributed_context,
    predict_dataset,
)

__all__ = [
    "ClassifierConfig",
    "train_classifier",
    "class_weights",
    "classifier_metrics",
    "make_training_step",
    "prepare_data",
    "PreparedData",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of ``covidctnet train-classifier`` (defaults = ``configs/classifier.yaml``).

    Attributes:
        depth: slices of the residual grid (network input D); the residual volumes must have it.
        size_xy: in-plane size of the residual grid (network input H = W).
        arch: ``covidctnet3d`` (official CNN) or a MONAI 3D net (``densenet121``, ``resnet18`` …).
        init: a MedicalNet-style 3D ResNet checkpoint (Tencent MedicalNet's ``resnet_18_23dataset.pth`` …) that starts
            the network (null: random weights); ``arch`` must be ``resnet10``/``18``/``34``/``50``, built in
            MedicalNet's layout (:func:`~covidctnet.models.pretrained.medicalnet_resnet_kwargs`, recorded in the model
            directory). Its segmentation head is left out; the classification head starts at random.
        epochs: maximum training epochs.
        batch_size: volumes per optimiser step (per process under DDP).
        lr: Adam learning rate (official CovidCTNet: 1e-4).
        weight_decay: Adam L2 weight decay.
        class_weighted_loss: weight the cross-entropy by ``n / (K · n_c)`` over the K classes of the training set.
        augment: MONAI 3D augmentation of training volumes (left-right flip and a small affine).
        flip_prob: probability of a left-right flip.
        affine_prob: probability of the random affine.
        rotate_deg: largest rotation in the axial plane (degrees, either way).
        scale: largest relative zoom per axis (±).
        translate_frac: largest shift per axis as a fraction of its size.
        val_fraction: share of each class's patients held out for validation (seeded split only).
        test_fraction: share of each class's patients held out as a test set, never used here (seeded split only).
        seed: seed of the split, weights, data order and augmentation.
        patience: early stop after this many epochs without a better monitored metric (null: never).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: DataLoader worker processes reading and augmenting volumes (0 = in the main process).
        cache: decode each residual NIfTI once into an uncompressed ``.npy`` in ``<residuals>/cache/`` and read that
            (11.5 MB per study at 50×240×240); false: decompress the NIfTI at every read. Volumes are never kept in
            memory, so memory does not grow with the number of studies.
        steps_per_epoch: cap on optimiser steps per epoch (null: one pass over the training set).
        max_steps: stop after this many optimiser steps in all, even inside an epoch (null: run ``epochs``).
        checkpoint_every: also write ``checkpoints/last.pt`` every this many optimiser steps (null: after each epoch
            only); ``--resume`` continues inside the epoch as if never stopped (exact on CPU).
    """

    depth: int = 50
    size_xy: int = 240
    arch: str = "covidctnet3d"
    init: str | None = None
    epochs: int = 50
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    class_weighted_loss: bool = True
    augment: bool = True
    flip_prob: float = 0.5
    affine_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate_frac: float = 0.05
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    patience: int | None = 10
    device: str = "auto"
    workers: int = 0
    cache: bool = True
    steps_per_epoch: int | None = None
    max_steps: int | None = None
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if self.depth < 1 or self.size_xy < 1:
            raise ConfigError(f"'depth' and 'size_xy' must be >= 1, not {self.depth} and {self.size_xy}")
        if self.init is not None and self.arch not in MEDICALNET_ARCHS:
            raise ConfigError(f"init {self.init}: MedicalNet weights are for the 3D ResNets {list(MEDICALNET_ARCHS)}, "
                              f"not arch {self.arch!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"'epochs' and 'batch_size' must be >= 1, not {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"'lr' must be > 0 and 'weight_decay' >= 0, not {self.lr} and {self.weight_decay}")
        for key in ("flip_prob", "affine_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"'{key}' must be in [0, 1], not {getattr(self, key)}")
        if not 0.0 <= self.rotate_deg <= 45.0:
            raise ConfigError(f"'rotate_deg' must be in [0, 45], not {self.rotate_deg}")
        if not 0.0 <= self.scale <= 0.5 or not 0.0 <= self.translate_frac <= 0.5:
            raise ConfigError(f"'scale' and 'translate_frac' must be in [0, 0.5], not {self.scale} and "
                              f"{self.translate_frac}")
        if not (0.0 <= self.val_fraction < 1 and 0.0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(f"'val_fraction' and 'test_fraction' must be in [0, 1) with a sum < 1, not "
                              f"{self.val_fraction} and {self.test_fraction}")
        if self.patience is not None and self.patience < 0:
            raise ConfigError(f"'patience' must be >= 0 or null, not {self.patience}")
        if self.workers < 0:
            raise ConfigError(f"'workers' must be >= 0, not {self.workers}")
        for key in ("steps_per_epoch", "max_steps", "checkpoint_every"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1 or null, not {getattr(self, key)}")

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(D, H, W) of the network input."""
        return (self.depth, self.size_xy, self.size_xy)


# --------------------------------------------------------------------------------------------------------------------
# loss and metrics


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int = len(CLASS_NAMES)) -> torch.Tensor:
    """Cross-entropy class weights ``n / (K · n_c)`` over the K classes present (1 for absent classes).

    A balanced set gets all ones; a class with half the average count gets 2. Absent classes never appear as targets,
    so their weight does not matter.

    Returns:
        (num_classes,) float32.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def classifier_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Validation figures of 3-class probabilities.

    Args:
        labels: (N,) class indices.
        probs: (N, 3) probabilities in ``CLASS_NAMES`` order (rows sum to 1).

    Returns:
        ``loss`` (mean cross-entropy, unweighted), ``accuracy``, ``auc`` (macro one-vs-rest over the classes present:
        the mean over present classes c of AUC(p_c; c vs rest); equals scikit-learn's macro OvR AUC when all three are
        present; NaN with fewer than two classes), ``auc_per_class`` ({name: AUC or NaN}), ``classes_present``, ``n``.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    present = sorted(int(c) for c in np.unique(y))
    per_class: dict[str, float] = {}
    for c, name in enumerate(CLASS_NAMES):
        per_class[name] = float(roc_auc_score(y == c, p[:, c])) if c in present and len(present) >= 2 else math.nan
    aucs = [per_class[CLASS_NAMES[c]] for c in present]
    eps = 1e-7
    return {
        "loss": float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0)))),
        "accuracy": float(np.mean(p.argmax(1) == y)),
        "auc": float(np.mean(aucs)) if len(present) >= 2 else math.nan,
        "auc_per_class": per_class,
        "classes_present": [CLASS_NAMES[c] for c in present],
        "n": int(len(y)),
    }


def make_training_step(weight: torch.Tensor | None = None) -> Any:
    """``(model, batch) -> loss``: cross-entropy of the logits of ``batch["image"]`` against ``batch["label"]``.

    Args:
        weight: optional (3,) class weights (see :func:`class_weights`).
    """
    def training_step(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = net(batch["image"])
        w = None if weight is None else weight.to(logits.device)
        return nn.functional.cross_entropy(logits.float(), batch["label"], weight=w)

    return training_step


# --------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class PreparedData:
    """The studies of a run and their split."""

    records: list[Any]  # ResidualRecord, every labelled ok residual
    assignment: dict[str, str]  # study_id -> train / val / test
    train: list[Any]
    val: list[Any]
    test: list[Any]
    split_source: str


def prepare_data(
    residuals_dir: str | os.PathLike,
    labels: str | os.PathLike | None,
    cfg: ClassifierConfig,
    split_file: str | os.PathLike | None = None,
) -> PreparedData:
    """Read the labelled residuals and split them by patient (split file if given, else seeded).

    Raises:
        InputError / LabelError: unusable residuals folder or labels.
        SplitError: a bad split file, a patient in two sets, or an empty train or validation set.
    """
    records = build_records(residuals_dir, labels)
    if split_file is not None:
        assignment = apply_split_file(records, split_file)
        source = str(split_file)
    else:
        assignment = split_patients(records, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        source = f"seed {cfg.seed}, val_fraction {cfg.val_fraction}, test_fraction {cfg.test_fraction}"
    parts = {s: [r for r in records if assignment.get(r.study_id) == s] for s in ("train", "val", "test")}
    # An empty validation set is allowed only when asked for: val_fraction 0 without a split file, i.e. a final
    # training on every study after the settings were chosen elsewhere.
    no_val_ok = split_file is None and cfg.val_fraction == 0
    for s in ("train",) if no_val_ok else ("train", "val"):
        if not parts[s]:
            raise SplitError(f"{source}: the {s} set is empty; the classifier needs training and validation studies")
    return PreparedData(records, assignment, parts["train"], parts["val"], parts["test"], source)


def _counts(records: Sequence[Any]) -> dict[str, int]:
    counts = np.bincount([r.label for r in records], minlength=len(CLASS_NAMES))
    return {name: int(c) for name, c in zip(CLASS_NAMES, counts)}


# --------------------------------------------------------------------------------------------------------------------
# outputs


def _write_val_outputs(run_dir: Path, records: Sequence[Any], probs: np.ndarray, metrics: dict[str, Any]) -> None:
    y = np.array([r.label for r in records], dtype=np.int64)
    write_csv(run_dir / "val_preds.csv",
              ["study_id", "patient_id", "label", "p_control", "p_covid", "p_cap", "predicted"],
              ([rec.study_id, rec.patient_id, rec.label_name, *(f"{v:.6f}" for v in p), CLASS_NAMES[int(np.argmax(p))]]
               for rec, p in zip(records, probs)))
    atomic_write_text(run_dir / "val_metrics.json", json.dumps(to_jsonable(metrics), indent=2) + "\n")
    present = [CLASS_NAMES.index(c) for c in metrics["classes_present"]]
    if len(present) >= 2:
        curves = []
        for c in present:
            fpr, tpr, _ = roc_curve(y == c, probs[:, c])
            curves.append(RocCurve(fpr, tpr, f"{CLASS_NAMES[c]} vs rest", auc=metrics["auc_per_class"][CLASS_NAMES[c]]))
        plot_roc(run_dir / "roc.png", curves,
                 title=f"Validation ROC, one vs rest (n={len(y)}; macro AUC {metrics['auc']:.3f})")
    else:
        (run_dir / "roc.png").unlink(missing_ok=True)  # a stale curve from an earlier run would mislead
        logger.warning("roc.png not written: the validation set holds only %s", metrics["classes_present"])
    cm = confusion_matrix(y, probs.argmax(1), labels=list(range(len(CLASS_NAMES))))
    plot_confusion(run_dir / "confusion.png", cm, CLASS_NAMES, title=f"Validation (n={len(y)}), argmax")


def _metric_text(x: float) -> str:
    """A validation metric with three decimals for logs and the model card; ``n/a`` when undefined."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _card(cfg: ClassifierConfig, data: PreparedData, residuals_dir: str, command: str, metrics: dict[str, Any],
          monitor: str, result: Any, denoiser: str | None = None, no_denoiser: str | None = None,
          lesion: str | None = None) -> str:
    counts = {s: _counts(getattr(data, s)) for s in ("train", "val", "test")}
    rows = "\n".join(
        f"| {s} | {len(getattr(data, s))} | {len({r.patient_id for r in getattr(data, s)})} | "
        + " | ".join(str(counts[s][c]) for c in CLASS_NAMES) + " |"
        for s in ("train", "val", "test")
    )
    per_class = ", ".join(f"{k} {_metric_text(v)}" for k, v in metrics["auc_per_class"].items())
    if denoiser is not None:
        den_text = (f"The BCDU-Net denoiser that made the residuals ({denoiser}) is bundled as component `denoiser`, "
                    "with its preprocessing (`preprocess` in config.yaml), so `covidctnet predict --model THIS_DIR` "
                    "runs the whole chain.")
    else:
        den_text = (f"**No denoiser is bundled** ({no_denoiser}); `covidctnet predict` needs one to make residual "
                    "maps, so this directory serves the classifier alone (load it with "
                    "`covidctnet.models.registry.load_classifier`).")
    if lesion is not None:
        what = (f"a lesion-probability volume (the label-free lesion model's map inside the lungs, from `covidctnet "
                f"residuals --lesion-model`; the model, {lesion}, is bundled as component `lesion` and `predict` "
                "computes the same evidence: `evidence: lesion` in config.yaml)")
    else:
        what = "a residual volume (preprocessed CT − BCDU-Net denoised CT, from `covidctnet residuals`)"
    selection = {"val_auc": "highest validation macro one-vs-rest AUC",
                 "val_loss": "lowest validation loss (the validation set holds a single class: its AUC is undefined)",
                 "train_loss": "lowest training loss: there is no validation set"}[monitor]
    if metrics["n"]:
        validation = f"""## Validation figures (used for model selection: optimistic, not a test result)
n = {metrics['n']} studies, classes present: {', '.join(metrics['classes_present'])}.
Macro one-vs-rest AUC {_metric_text(metrics['auc'])} (per class: {per_class}); accuracy (argmax) {_metric_text(metrics['accuracy'])};
cross-entropy {_metric_text(metrics['loss'])}. See `val_metrics.json`; ROC and confusion matrix PNGs are in the run folder."""
    else:
        validation = """## Validation figures
**None.** This run had no validation set (`val_fraction: 0`): every study was used for training, so nothing here
says how the model performs on new scans."""
    return f"""# covidctnet 3D classifier ({cfg.arch}, input {cfg.depth}×{cfg.size_xy}×{cfg.size_xy})

Classifies {what} into
control (0), COVID-19 (1) or community-acquired pneumonia (2), after CovidCTNet (Javaheri et al., npj Digit. Med. 4,
29 (2021)). Research software, **not a medical device**; not for diagnosis or any clinical decision.

## Data
- Training volumes: `{residuals_dir}`; split: {data.split_source} (patient-level, listed in `split.csv`).
- {den_text}

| split | studies | patients | {' | '.join(CLASS_NAMES)} |
|---|---|---|{'---|' * len(CLASS_NAMES)}
{rows}

The test studies (if any) were not used in any way by this run; evaluate them with `covidctnet predict` and
`covidctnet evaluate`.

## Training
```
{command}
```
Config: `training_config.yaml`. Adam lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, batch {cfg.batch_size},
{'class-weighted' if cfg.class_weighted_loss else 'unweighted'} cross-entropy,
augmentation {'on (left-right flip, small affine)' if cfg.augment else 'off'}. {result.epochs_run} epoch(s) run,
best epoch {result.best_epoch} ({selection}){', stopped early' if result.stopped_early else ''}.

{validation}

## Intended use and limits
Research on CT evidence maps produced with the same preprocessing and model as the training volumes; inputs
must be {cfg.size_xy}×{cfg.size_xy}×{cfg.depth} NIfTIs (RAS), fed through
`covidctnet.models.cnn3d.residual_to_network_input`. Figures from a small validation set have wide
confidence intervals; performance on other scanners, protocols or populations is unknown.
"""


# --------------------------------------------------------------------------------------------------------------------
# the residuals' provenance and the denoiser that made them


def _residuals_info(residuals_dir: str | os.PathLike, cfg: ClassifierConfig) -> dict[str, Any] | None:
    """``RESIDUALS/residuals.yaml`` (denoiser, its hash, grid, preprocessing) if present; checks the grid.

    Raises:
        ConfigError: the residuals were made on another grid than the config's ``depth`` / ``size_xy``.
    """
    path = Path(residuals_dir) / "residuals.yaml"
    if not path.is_file():
        return None
    try:
        info = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: expected a mapping, not {type(info).__name__}")
    grid = (info.get("size_xy"), info.get("depth"))
    if None not in grid and grid != (cfg.size_xy, cfg.depth):
        raise ConfigError(
            f"{path}: residuals are {grid[0]}x{grid[0]}x{grid[1]} (size_xy x size_xy x depth), the config says "
            f"{cfg.size_xy}x{cfg.size_xy}x{cfg.depth}; set depth and size_xy in --config to match"
        )
    return info


def _paired_denoiser(info: dict[str, Any] | None, cfg: ClassifierConfig) -> tuple[dict[str, Any] | None, str]:
    """The denoiser that made the residuals, to bundle with the classifier so ``predict`` can use the model dir.

    Returns:
        ``({"entry": component entry, "state": state dict, "preprocess": config}, note)`` when the denoiser named in
        ``residuals.yaml`` still exists with the recorded hash and takes the classifier's in-plane size; else
        ``(None, reason)``. Never raises: a missing denoiser only means the model dir holds the classifier alone.
    """
    if not info or not info.get("denoiser"):
        return None, "the residuals folder has no residuals.yaml naming its denoiser"
    try:
        md = load_model_dir(resolve_denoiser_dir(info["denoiser"]))
        sha = md.weights_sha256("denoiser")
        if info.get("denoiser_sha256") and sha != info["denoiser_sha256"]:
            return None, (f"the denoiser at {md.path} has weights {sha[:12]}…, the residuals were made with "
                          f"{str(info['denoiser_sha256'])[:12]}…")
        preprocess = dict(md.config.get("preprocess") or info.get("preprocess") or {})
        size = (md.config.get("input") or {}).get("size_xy", preprocess.get("size_xy"))
        if size != cfg.size_xy:
            return None, f"the denoiser takes {size}x{size} slices, the classifier {cfg.size_xy}x{cfg.size_xy}"
        entry = {k: v for k, v in md.component("denoiser").items() if k != "weights"}
        entry["source"] = {"path": str(md.path.resolve()), "weights_sha256": sha}
        return {"entry": entry, "state": md.state_dict("denoiser"), "preprocess": preprocess}, str(md.path)
    except (CovidCTNetError, OSError, KeyError) as err:
        return None, f"its denoiser {info['denoiser']} cannot be loaded ({str(err).splitlines()[0][:200]})"


def _paired_lesion_model(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lesion model that made the training volumes (``evidence: lesion`` in ``residuals.yaml``), to bundle as
    component ``lesion`` so that ``predict`` computes the same evidence.

    Raises:
        ConfigError: the lesion model is gone or its weights changed (the classifier would be bundled with another
            evidence than it learnt).
    """
    if not info or info.get("evidence", "residual") != "lesion":
        return None
    try:
        md = load_model_dir(resolve_denoiser_dir(info["lesion_model"]))
        sha = md.weights_sha256(LESION_COMPONENT)
    except (CovidCTNetError, OSError, KeyError) as err:
        raise ConfigError(f"the lesion model {info.get('lesion_model')} that made the training volumes cannot be "
                          f"loaded ({str(err).splitlines()[0][:200]})") from err
    if sha != info.get("lesion_model_sha256"):
        raise ConfigError(f"the lesion model at {md.path} has weights {sha[:12]}…, the training volumes were made "
                          f"with {str(info.get('lesion_model_sha256'))[:12]}…")
    entry = {k: v for k, v in md.component(LESION_COMPONENT).items() if k != "weights"}
    entry["source"] = {"path": str(md.path.resolve()), "weights_sha256": sha}
    return {"entry": entry, "state": md.state_dict(LESION_COMPONENT)}


# --------------------------------------------------------------------------------------------------------------------
# train-classifier


def _check_resume(run_dir: Path, resume: bool, split_file: str | os.PathLike | None) -> str | os.PathLike | None:
    """Refuse to overwrite a run (before ``split.csv`` is touched) or to resume none; return the split file to use (a
    resumed run without one reuses its own ``split.csv``, so it trains on the same studies)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not resume and last.exists():
        raise CheckpointError(f"{last}: a run already exists here; pass --resume to continue it or use a new run "
                              "directory")
    if resume and not last.is_file():
        raise CheckpointError(f"{last}: checkpoint not found; nothing to resume (drop --resume to start a new run)")
    if resume and split_file is None and (run_dir / "split.csv").is_file():
        split_file = run_dir / "split.csv"
        logger.info("resume: reusing the run's split %s", split_file)
    return split_file


def _selection_metric(data: PreparedData) -> tuple[str, str]:
    """``(monitor, mode)`` for epoch selection and early stopping: macro AUC when the validation set has two classes
    or more, its loss when it has one, the training loss when there is none."""
    val_classes = sorted({r.label_name for r in data.val})
    if not data.val:
        logger.warning("no validation set (val_fraction 0): the epoch with the lowest training loss is kept and there "
                       "is no validation figure")
        return "train_loss", "min"
    if len(val_classes) == 1:
        logger.warning("validation set holds a single class (%s): AUC is undefined, so model selection and early "
                       "stopping use val_loss instead", val_classes[0])
        return "val_loss", "min"
    if len(val_classes) < len(CLASS_NAMES):
        logger.warning("validation set holds only %s: val_auc is the macro one-vs-rest AUC over these classes",
                       val_classes)
    return "val_auc", "max"


def train_classifier(
    residuals_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: ClassifierConfig = ClassifierConfig(),
    labels: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    resume: bool = False,
    command: str | None = None,
) -> RunResult:
    """Train the 3D classifier on residual volumes; select the epoch on validation AUC; write plots and a model dir.

    Args:
        residuals_dir: output folder of ``covidctnet residuals`` (``manifest.csv`` + ``<id>_residual.nii.gz``,
            each (size_xy, size_xy, depth) float32 RAS).
        run_dir: output folder (see the module docstring).
        cfg: the resolved config.
        labels: labels CSV ``study_id,label[,patient_id]`` (None: the manifest's ``label`` column).
        split_file: CSV ``study_id,split`` (train / val / test); None: a seeded patient-level split. With ``resume``
            and no split file, the run's own ``split.csv`` is reused, so a resumed run trains on the same studies.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        command: the command line, recorded in the model card.

    Returns:
        :class:`~covidctnet.training.trainer.RunResult`: ``val`` holds :func:`classifier_metrics` of the exported
        epoch, ``details`` ``n_train``, ``n_val``, ``n_test`` and ``denoiser_bundled``.

    Raises:
        InputError, LabelError, SplitError: bad residuals, labels or split (one-line messages naming the file).
        ConfigError: unknown architecture or impossible input size.
        CheckpointError: ``resume`` without a checkpoint, or an existing run without ``resume``.
    """
    run_dir = Path(run_dir)
    split_file = _check_resume(run_dir, resume, split_file)
    info = _residuals_info(residuals_dir, cfg)
    data = prepare_data(residuals_dir, labels, cfg, split_file)
    _log_split(data)
    seed_everything(cfg.seed)
    model = _build_model(cfg, residuals_dir)
    init_info = load_medicalnet_weights(model, cfg.init) if cfg.init and not resume else None
    train_ds, val_ds = _datasets(cfg, data)
    weight = class_weights(train_ds.labels) if cfg.class_weighted_loss else None
    if weight is not None:
        logger.info("class weights %s", dict(zip(CLASS_NAMES, (round(float(w), 4) for w in weight))))

    monitor, mode = _selection_metric(data)

    val_labels = val_ds.labels

    def validate(net: nn.Module, device: torch.device) -> dict[str, float]:
        m = classifier_metrics(val_labels, predict_dataset(net, val_ds, device, cfg.batch_size))
        return {"val_loss": m["loss"], "val_auc": m["auc"], "val_acc": m["accuracy"]}

    ctx = distributed_context()
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_split_csv(run_dir / "split.csv", data.records, data.assignment)
    trainer = Trainer(
        model,
        run_dir,
        train_data=train_ds,
        training_step=make_training_step(weight),
        loop=LoopConfig.of(cfg),
        validate=validate if data.val else None,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        monitor=monitor,
        mode=mode,
        config=cfg,
    )
    finished: list[RunResult] = []  # filled on rank 0 by describe()

    def describe(fit: Any) -> ModelExport:
        export, result = _finish(trainer, fit, cfg, data, val_ds, monitor, residuals_dir, info, command, init_info)
        finished.append(result)
        return export

    fit, _ = trainer.run(describe, "classifier", resume=resume)
    return finished[0] if finished else RunResult(run_dir, None, fit.best_epoch, fit.epochs_run, monitor)


def _log_split(data: PreparedData) -> None:
    logger.info("split (%s): train %s, val %s, test %s", data.split_source, _counts(data.train), _counts(data.val),
                _counts(data.test))
    missing_train = [c for c, n in _counts(data.train).items() if n == 0]
    if missing_train:
        logger.warning("no training study of class(es) %s: the classifier cannot learn them", missing_train)


def _build_model(cfg: ClassifierConfig, residuals_dir: str | os.PathLike) -> nn.Module:
    """The configured network for the residual grid (depth, size_xy) of ``residuals_dir``.

    Raises:
        ConfigError: an architecture that cannot take that grid (the message names the folder, the grid and the arch).
    """
    try:
        return build_classifier(cfg.arch, in_channels=1, num_classes=len(CLASS_NAMES), input_size=cfg.input_size,
                                **_arch_kwargs(cfg))
    except ConfigError as err:
        # the grid is the residual volumes' (the config must match them): name the folder, the keys and the arch
        raise ConfigError(f"{residuals_dir}: arch {cfg.arch!r} on residual volumes of depth {cfg.depth}, size_xy "
                          f"{cfg.size_xy}: {err}") from err


def _datasets(cfg: ClassifierConfig, data: PreparedData) -> tuple[ResidualVolumeDataset, ResidualVolumeDataset]:
    """The training set (augmented when ``cfg.augment``) and the validation set (never augmented)."""
    aug = None
    if cfg.augment:
        aug = build_augmentation(cfg.flip_prob, cfg.affine_prob, cfg.rotate_deg, cfg.scale, cfg.translate_frac,
                                 cfg.input_size)
    train_ds = ResidualVolumeDataset(data.train, cfg.depth, cfg.size_xy, aug, seed=cfg.seed, cache=cfg.cache)
    val_ds = ResidualVolumeDataset(data.val, cfg.depth, cfg.size_xy, None, seed=cfg.seed, cache=cfg.cache)
    return train_ds, val_ds


def _arch_kwargs(cfg: ClassifierConfig) -> dict[str, Any]:
    """Constructor arguments beyond the arch name: MedicalNet's ResNet layout when its weights start the run."""
    return medicalnet_resnet_kwargs(cfg.arch) if cfg.init else {}


def _finish(trainer: Any, result: Any, cfg: ClassifierConfig, data: PreparedData, val_ds: Any, monitor: str,
            residuals_dir: str | os.PathLike, info: dict[str, Any] | None,
            command: str | None, init_info: dict[str, Any] | None = None) -> tuple[ModelExport, RunResult]:
    """Rank 0 after training: validation outputs of the best epoch, and what to write as the model directory."""
    run_dir = trainer.run_dir
    best_state = trainer.best_state_dict()
    best = _build_model(cfg, residuals_dir)
    best.load_state_dict(best_state)
    best.to(trainer.device)
    if data.val:
        probs = predict_dataset(best, val_ds, trainer.device, cfg.batch_size)
        metrics = classifier_metrics(val_ds.labels, probs)
    else:
        metrics = {"loss": math.nan, "accuracy": math.nan, "auc": math.nan, "n": 0, "classes_present": [],
                   "auc_per_class": {name: math.nan for name in CLASS_NAMES}}
    metrics["monitor"] = monitor
    metrics["best_epoch"] = int(result.best_epoch)
    if data.val:
        _write_val_outputs(run_dir, data.val, probs, metrics)
    logger.info("best epoch %d (%s): validation macro AUC %s, accuracy %s, loss %s (n=%d, classes %s)",
                result.best_epoch, monitor, _metric_text(metrics["auc"]), _metric_text(metrics["accuracy"]),
                _metric_text(metrics["loss"]), metrics["n"], metrics["classes_present"])
    paired, note = _paired_denoiser(info, cfg)
    lesion = _paired_lesion_model(info)
    components: dict[str, Any] = {"classifier": dict(best.spec)}
    states = {"classifier": best_state}
    config: dict[str, Any] = {
        "name": f"covidctnet-classifier-{cfg.arch}-{cfg.depth}x{cfg.size_xy}",
        "task": "classifier" if paired is None else "covidctnet",
        "class_names": list(CLASS_NAMES),
        "components": components,
        "input": {
            "depth": cfg.depth,
            "size_xy": cfg.size_xy,
            "layout": "(1, D, H, W) = residual_to_network_input((size_xy, size_xy, depth) RAS residual)",
            "converter": "covidctnet.models.cnn3d.residual_to_network_input",
        },
    }
    config["evidence"] = "lesion" if lesion is not None else "residual"
    if lesion is not None:
        components[LESION_COMPONENT] = lesion["entry"]
        states[LESION_COMPONENT] = lesion["state"]
        config["input"]["layout"] = ("(1, D, H, W) = residual_to_network_input((size_xy, size_xy, depth) RAS lesion "
                                     "map)")
    if paired is not None:
        components["denoiser"] = paired["entry"]
        states["denoiser"] = paired["state"]
        config["preprocess"] = paired["preprocess"]
        logger.info("bundled the denoiser %s with the classifier: %s is ready for `covidctnet predict`", note,
                    run_dir / "model")
    else:
        logger.warning("the model directory holds the classifier only (%s); `covidctnet predict` needs a denoiser "
                       "as well", note)
    config["training"] = {
        "residuals": str(residuals_dir),
        "residuals_info": info or {},
        "command": command or "",
        "split": data.split_source,
        "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
        "monitor": monitor,
        "best_epoch": int(result.best_epoch),
        "epochs_run": int(result.epochs_run),
        "seed": int(cfg.seed),
        "init": init_info or ({"source": "medicalnet", "file": str(cfg.init)} if cfg.init else None),
    }
    config["validation"] = to_jsonable({k: metrics[k] for k in ("n", "auc", "auc_per_class", "accuracy", "loss",
                                                               "classes_present")})
    card = _card(cfg, data, str(residuals_dir), command or "(library call)", metrics, monitor, result,
                 note if paired is not None else None, note if paired is None else None,
                 lesion["entry"]["source"]["path"] if lesion is not None else None)
    extra = {"training_config.yaml": run_dir / "config.yaml", "metrics.csv": run_dir / "metrics.csv",
             "split.csv": run_dir / "split.csv"}
    details = {"n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
               "denoiser_bundled": paired is not None}
    return ModelExport(config, card, extra, states), RunResult(run_dir, run_dir / "model", int(result.best_epoch),
                                                               int(result.epochs_run), monitor, metrics,
                                                               list(result.history), details)
