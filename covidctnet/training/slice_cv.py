"""``covidctnet cv-slice``: choose and ship a slice model by grouped K-fold cross-validation.

The UCSD images are figure panels of papers, and panels of one paper (often of one patient) look more like each other
than like new ones. One validation split of 118 images chose the earlier bundle and its figures did not carry to the
official test split (``docs/implementation-notes.md``). Here every labelled image (``train`` + ``val``) is out-of-fold
(OOF) exactly once:

* :func:`source_groups` gives each image a group (the source paper for COVID images, a figure or a run of neighbouring
  numbers for non-COVID ones) and :func:`assign_folds` puts whole groups into folds with scikit-learn's
  ``StratifiedGroupKFold``, so no paper straddles a training and a held-out fold;
* each fold trains the ``train-slice`` recipe for its fixed number of epochs and keeps the **last** epoch (choosing
  an epoch on the held-out fold would leak);
* the pooled OOF predictions give the AUC (DeLong and cluster-bootstrap CIs), accuracy and F1 at a **nested**
  threshold (each fold called at Youden's J of the other folds' OOF predictions), with cluster-bootstrap CIs;
* the K fold models become one ensemble model directory (:class:`~covidctnet.models.slice.SliceEnsemble`, as made by
  ``ensemble-slice``) whose threshold is Youden's J on all OOF predictions and whose ``config.yaml`` and card record
  the OOF estimate as its expected performance.

:func:`compare_cv_runs` tests two runs on the same folds against each other (paired DeLong and paired cluster
bootstrap of the AUC difference).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from covidctnet.core.errors import ConfigError, SplitError
from covidctnet.core.files import atomic_write_text, write_csv
from covidctnet.core.labels import BINARY_CLASS_NAMES
from covidctnet.core.model_dir import save_model_dir
from covidctnet.core.seeding import seed_everything
from covidctnet.data.ucsd import (
    SliceDataset,
    SliceRecord,
    build_slice_transforms,
    find_records,
    load_grey,
    prepare_slice,
)
from covidctnet.evaluation.plots import RocCurve, plot_confusion, plot_roc
from covidctnet.evaluation.stats import bootstrap_ci, delong_auc_ci, delong_test
from covidctnet.models.grad_cam import CamScale, CamScaleConfig, cam_scale_of
from covidctnet.models.registry import load_slice_model
from covidctnet.models.slice import SliceEnsemble, build_slice_model
from covidctnet.training.slice import (
    SliceTrainConfig,
    dataset_cam_maps,
    dataset_cam_scale,
    init_slice_weights,
    recorded_cam_scale,
    slice_model_config,
    slice_model_kwargs,
    slice_training_step,
    youden_threshold,
)
from covidctnet.training.trainer import LoopConfig, Trainer, predict_dataset

__all__ = ["assign_folds", "compare_cv_runs", "cv_records", "cv_slice", "nested_thresholds", "oof_cam_scale",
           "source_groups"]

logger = logging.getLogger(__name__)

PNG_RUN_GAP = 5
"""Non-COVID ``N.png`` files whose numbers differ by at most this much are chained into one group."""

_COVID_PAPER = re.compile(r"^(.+?)-p\d")  # medRxiv/bioRxiv id before "-p<page>": 2020.02.22.20024927-p19-62.png
_FIGURE = re.compile(r"^(\d+)%\d+$")  # non-COVID panels "N%k" of one figure
_NUMBER = re.compile(r"^\d+$")


def source_groups(records: Sequence[SliceRecord], png_gap: int = PNG_RUN_GAP) -> list[str]:
    """A source group for each image, from its file name (UCSD COVID-CT naming), so that a group can stay in one fold.

    * COVID images (``2020.02.22.20024927-p19-62.png``): the paper id before ``-p<page>``; a patient's slices come
      from one paper, so a patient stays in one group too. Other names: the name up to the first ``%`` or ``_``.
    * non-COVID ``N%k.jpg`` and ``N.jpg``: the number ``N`` (the panels of one figure).
    * non-COVID ``N.png``: runs of numbers with gaps of at most ``png_gap`` (neighbouring numbers are often one
      patient in other windows or levels). The UCSD non-COVID images carry no patient or paper identifier (its meta
      sheet is not read here), so this is a proxy: distant numbers of one patient would fall in different groups.
    * any other name: the name up to the first ``%`` or ``_``.

    Args:
        records: the images (labels 1 = COVID, 0 = non-COVID).
        png_gap: the largest gap between the numbers of chained non-COVID PNG files.

    Returns:
        One group name per record, prefixed by the class (a group never mixes classes).
    """
    groups: list[str | None] = [None] * len(records)
    pngs: list[tuple[int, int]] = []  # (number, record index) of the non-COVID N.png files
    for i, rec in enumerate(records):
        stem, suffix = rec.path.stem, rec.path.suffix.lower()
        cls = "covid" if rec.label == 1 else "noncovid"
        paper = _COVID_PAPER.match(stem)
        figure = _FIGURE.match(stem)
        if rec.label == 1 and paper:
            groups[i] = f"{cls}:{paper.group(1)}"
        elif rec.label != 1 and figure:
            groups[i] = f"{cls}:fig{figure.group(1)}"
        elif rec.label != 1 and _NUMBER.match(stem) and suffix == ".png":
            pngs.append((int(stem), i))
        elif rec.label != 1 and _NUMBER.match(stem):
            groups[i] = f"{cls}:fig{stem}"
        else:
            groups[i] = f"{cls}:{re.split(r'[%_]', stem)[0]}"
    start = None
    previous = None
    for number, i in sorted(pngs):
        if previous is None or number - previous > png_gap:
            start = number
        groups[i] = f"noncovid:png{start}"
        previous = number
    return [str(g) for g in groups]


def assign_folds(labels: Sequence[int], groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0 … folds-1) of every image: whole groups per fold, class shares kept as far as groups allow.

    Uses scikit-learn's ``StratifiedGroupKFold(folds, shuffle=True, random_state=seed)``, so the assignment is a pure
    function of the labels, groups, their order and the seed.

    Raises:
        ConfigError: fewer than 2 folds, or fewer groups of a class than folds.
    """
    labels_arr, groups_arr = np.asarray(labels).astype(int), np.asarray(groups)
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, not {folds}")
    for lab in (0, 1):
        n = len(np.unique(groups_arr[labels_arr == lab]))
        if n < folds:
            raise ConfigError(f"{folds} folds need at least {folds} source groups per class; "
                              f"class {BINARY_CLASS_NAMES[lab]} has {n}")
    fold = np.full(len(labels_arr), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(labels_arr)), labels_arr, groups_arr)):
        fold[held] = k
    return fold


def nested_thresholds(labels: np.ndarray, p_covid: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """(K,) decision threshold of each fold: Youden's J on the OOF predictions of the *other* folds.

    Calling fold k's images at its threshold never uses their own labels, so accuracy and F1 at these thresholds are
    not optimistic about the threshold (the pooled Youden threshold is).
    """
    return np.array([youden_threshold(labels[fold != k], p_covid[fold != k]) for k in range(int(fold.max()) + 1)])


def cv_records(data: str | os.PathLike) -> list[SliceRecord]:
    """Every labelled image of ``data``'s ``train`` and ``val`` splits (the test split is never read)."""
    records = find_records(data, "train") + find_records(data, "val")
    seen: set[Path] = set()
    for rec in records:
        if rec.path.resolve() in seen:
            raise SplitError(f"{data}: {rec.path.name} is in both train and val")
        seen.add(rec.path.resolve())
    return records


def oof_cam_scale(ensemble: nn.Module, records: Sequence[SliceRecord], size: int, lung_mask: bool, data: str,
                  cfg: CamScaleConfig | None = None, device: torch.device | str = "cpu") -> CamScale:
    """The Grad-CAM colour scale of a cross-validated ensemble from its out-of-fold images (every image of the run).

    The maps are the ensemble's own, the ones ``predict-slice --cam`` draws. Each image was held out by one member
    and trained on by the others; the fold models' own maps are no substitute: averaging maps that do not coincide
    lowers their peaks, so a single model's percentile is well above the ensemble's (6.7 against 4.1 log-odds for the
    bundled model), while a member's percentile on its training images is near the one on its held-out images
    (docs/gradcam.md).

    Args:
        ensemble: the ensemble of the fold models.
        records: every image of the run (``train`` + ``val``).
        size, lung_mask: the models' preprocessing.
        data: the dataset's name (no path).
        cfg: percentile and ``show_from``.
        device: where to compute the maps.
    """
    images = SliceDataset(list(records), size, lung_mask, None)
    return dataset_cam_scale(ensemble, images, "out-of-fold", f"{data} train+val", device, cfg)


# --------------------------------------------------------------------------------------------------------------------
# statistics


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _group_members(groups: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(len(names))], names


def _cluster_bootstrap(statistic: Any, groups: Sequence[str], labels: np.ndarray, n_boot: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CIs resampling whole groups, within class (each group is of one class)."""
    members, _ = _group_members(groups)
    strata = np.array([labels[m[0]] for m in members])
    return bootstrap_ci(lambda g: statistic(np.concatenate([members[i] for i in g])), len(members), strata=strata,
                        n_boot=n_boot, seed=seed)


def _cv_figures(labels: np.ndarray, p: np.ndarray, fold: np.ndarray, groups: Sequence[str],
                n_boot: int, seed: int) -> dict[str, Any]:
    thresholds = nested_thresholds(labels, p, fold)
    nested_pred = (p >= thresholds[fold]).astype(int)
    pooled_t = youden_threshold(labels, p)
    pooled_pred = (p >= pooled_t).astype(int)

    def stat(idx: np.ndarray) -> list[float]:
        y = labels[idx]
        return [_auc(y, p[idx]), float((nested_pred[idx] == y).mean()),
                float(f1_score(y, nested_pred[idx], zero_division=0)), float((pooled_pred[idx] == y).mean()),
                float(f1_score(y, pooled_pred[idx], zero_division=0))]

    point = stat(np.arange(len(labels)))
    low, high = _cluster_bootstrap(stat, groups, labels, n_boot, seed)
    delong = delong_auc_ci(labels, p)
    pos, neg = labels == 1, labels == 0
    names = ["auc", "accuracy_nested", "f1_nested", "accuracy_pooled_youden", "f1_pooled_youden"]
    return {
        "n": len(labels), "n_covid": int(pos.sum()), "n_groups": len(set(groups)),
        **{name: {"value": v, "cluster_ci": [float(lo), float(hi)]} for name, v, lo, hi in zip(names, point, low, high)},
        "auc_delong_ci": [delong.ci_low, delong.ci_high],
        "sensitivity_nested": float(nested_pred[pos].mean()), "specificity_nested": float(1 - nested_pred[neg].mean()),
        "nested_thresholds": [float(t) for t in thresholds],
        "pooled_youden_threshold": float(pooled_t),
        "fold_auc": [_auc(labels[fold == k], p[fold == k]) for k in range(len(thresholds))],
        "bootstrap": f"{n_boot} replicates of whole source groups, within class, seed {seed}",
    }


def _read_oof(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "oof_preds.csv"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no oof_preds.csv (not a finished cv-slice run)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"file": [r["file"] for r in rows], "label": np.array([int(r["label"] == "covid") for r in rows]),
            "fold": np.array([int(r["fold"]) for r in rows]), "group": [r["group"] for r in rows],
            "p": np.array([float(r["p_covid"]) for r in rows])}


def compare_cv_runs(run_dir: str | os.PathLike, reference_dir: str | os.PathLike, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two ``cv-slice`` runs on the same images and folds: AUC(run) - AUC(reference).

    Returns:
        ``{"auc", "auc_reference", "difference", "delong_p", "delong_se", "cluster_ci"}``: the DeLong test treats the
        images as independent; the cluster bootstrap resamples whole source groups (both models on the same draw).

    Raises:
        ConfigError: the runs differ in their images, labels or folds.
    """
    a, b = _read_oof(Path(run_dir)), _read_oof(Path(reference_dir))
    if a["file"] != b["file"] or not np.array_equal(a["fold"], b["fold"]) or not np.array_equal(a["label"],
                                                                                                 b["label"]):
        raise ConfigError(f"{run_dir} and {reference_dir}: not the same images, labels and folds; a paired "
                          "comparison needs the same data and fold seed")
    y = a["label"]
    test = delong_test(y, a["p"], b["p"])
    low, high = _cluster_bootstrap(lambda i: _auc(y[i], a["p"][i]) - _auc(y[i], b["p"][i]), a["group"], y, n_boot,
                                   seed)
    return {"reference": Path(reference_dir).name, "auc": test.aucs[0], "auc_reference": test.aucs[1],
            "difference": test.estimate, "delong_se": test.se, "delong_p": test.p_value,
            "cluster_ci": [float(low[0]), float(high[0])]}


# --------------------------------------------------------------------------------------------------------------------
# training


def _fold_config(cfg: SliceTrainConfig, data: str | os.PathLike, fold: int, folds: int, seconds: float,
                 command: str | None, held_maps: np.ndarray) -> dict[str, Any]:
    # predict-slice --cam's colour range, from the images this fold model is validated on
    scale = recorded_cam_scale(lambda: cam_scale_of(held_maps, "held-out fold",
                                                    f"{Path(data).name} train+val, fold {fold}"))
    return {
        **slice_model_config(cfg, f"covidctnet-slice-{cfg.arch}-{cfg.size}-fold{fold}"),
        "training": {"data": Path(data).name, "command": command or "", "fold": fold, "folds": folds,
                     "epochs_run": int(cfg.epochs), "epoch": "last", "seed": int(cfg.seed),
                     "seconds": round(seconds, 1)},
        **({"cam_scale": scale} if scale is not None else {}),
    }


def _train_fold(cache: list[np.ndarray], records: list[SliceRecord], train_idx: np.ndarray, held_idx: np.ndarray,
                cfg: SliceTrainConfig, fold_dir: Path) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """Train on ``train_idx`` for ``cfg.epochs`` epochs; return the last epoch's network, its held-out p(COVID) and
    its held-out Grad-CAM maps."""
    aug = build_slice_transforms(True, cfg.size, cfg.lung_mask, cfg.crop_scale, cfg.rotate_degrees, cfg.flip,
                                 cfg.intensity)
    train = SliceDataset([records[i] for i in train_idx], cfg.size, cfg.lung_mask, aug, seed=cfg.seed,
                         cache=[cache[i] for i in train_idx], source_aug=cfg.source_aug)
    held = SliceDataset([records[i] for i in held_idx], cfg.size, cfg.lung_mask, None,
                        cache=[cache[i] for i in held_idx])
    seed_everything(cfg.seed)
    model = build_slice_model(cfg.arch, **slice_model_kwargs(cfg))
    if cfg.init:
        init_slice_weights(model, cfg.init, cfg)

    def watch(net: nn.Module, device: torch.device) -> dict[str, float]:
        # logged to show how training went; never used to choose anything (the last epoch is kept)
        return {"heldout_auc": _auc(held.labels, predict_dataset(net, held, device)[:, 1])}

    trainer = Trainer(
        model, fold_dir, train_data=train, training_step=slice_training_step, validate=watch,
        loop=dataclasses.replace(LoopConfig.of(cfg), patience=None),  # a fold model runs every epoch; the last is kept
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
        scheduler_factory=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.epochs, eta_min=cfg.min_lr),
        monitor="train_loss", mode="min", sample_weights=train.class_balance_weights() if cfg.class_balance else None,
        ema_decay=cfg.ema, config=cfg, show_progress=False,
    )
    try:
        trainer.fit()
        net = trainer.eval_model.eval()
        probs = predict_dataset(net, held, trainer.device)[:, 1]
        maps = dataset_cam_maps(net, held, trainer.device)
        return net.cpu(), probs, maps
    finally:
        trainer.close()


def _fold_card(cfg: SliceTrainConfig, fold: int, folds: int, auc: float, n_held: int) -> str:
    return (f"# covidctnet slice model, fold {fold} of {folds} ({cfg.arch} x{cfg.width}, {cfg.size} px)\n\n"
            f"One member of a `cv-slice` ensemble: trained on the other {folds - 1} folds for {cfg.epochs} epochs "
            f"(last epoch kept). AUC on its {n_held} held-out images: {100 * auc:.1f}. Research software, not a "
            "medical device.\n")


# --------------------------------------------------------------------------------------------------------------------
# cv-slice


def cv_slice(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: SliceTrainConfig,
    folds: int = 5,
    fold_seed: int = 0,
    only_folds: Sequence[int] | None = None,
    reference: str | os.PathLike | None = None,
    n_boot: int = 2000,
    command: str | None = None,
) -> dict[str, Any]:
    """Grouped K-fold cross-validation of the ``train-slice`` recipe ``cfg`` and the ensemble of its fold models.

    Folds already finished in ``out_dir`` (``foldK/model`` and ``foldK/heldout_preds.csv``) are reused, so a run can
    be continued, and two processes can train different folds (``only_folds``) of one run.

    Args:
        data: UCSD or ``<split>/<class>/`` dataset; its ``train`` and ``val`` images are pooled.
        out_dir: ``folds.csv``; ``foldK/`` (the Trainer's run folder, ``model/``, ``heldout_preds.csv``); when every
            fold is done: ``oof_preds.csv`` (file, label, group, fold, p_covid, nested threshold, prediction),
            ``cv_metrics.json``, ``roc.png`` (one curve per fold and the pooled one), ``confusion.png`` (nested
            thresholds) and ``model/`` (the ensemble of the fold models).
        cfg: the recipe (``epochs`` are all run; the last epoch is kept; ``patience`` is ignored).
        folds: K.
        fold_seed: seed of the fold assignment.
        only_folds: train only these folds (the summary is written once every fold is done).
        reference: another finished ``cv-slice`` run on the same folds to test against (:func:`compare_cv_runs`).
        n_boot: cluster-bootstrap replicates.
        command: the command line, recorded in the configs and cards.

    Returns:
        ``cv_metrics.json``'s content, or ``{"folds_done": [...]}`` while some folds are still missing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = cv_records(data)
    labels = np.array([r.label for r in records])
    groups = source_groups(records)
    fold = assign_folds(labels, groups, folds, fold_seed)
    root = Path(data)
    names = [str(r.path.relative_to(root)) if r.path.is_relative_to(root) else r.path.name for r in records]
    rows = [[n, BINARY_CLASS_NAMES[y], g, str(k)] for n, y, g, k in zip(names, labels, groups, fold)]
    if (out_dir / "folds.csv").is_file():  # a run is continued only with the very same folds
        with open(out_dir / "folds.csv", newline="") as fh:
            if list(csv.reader(fh))[1:] != rows:
                raise ConfigError(f"{out_dir}: made with other images, groups or folds (--folds, --fold-seed); use "
                                  "a new output folder")
    write_csv(out_dir / "folds.csv", ["file", "label", "group", "fold"], rows)
    logger.info("%s: %d images (%d COVID) in %d source groups, %d folds of %s images", data, len(records),
                int(labels.sum()), len(set(groups)), folds, [int((fold == k).sum()) for k in range(folds)])
    todo = range(folds) if only_folds is None else sorted(set(only_folds))
    if any(k < 0 or k >= folds for k in todo):
        raise ConfigError(f"folds to train must be in 0..{folds - 1}, not {list(todo)}")
    cache: list[np.ndarray] | None = None
    for k in todo:
        fold_dir = out_dir / f"fold{k}"
        if (fold_dir / "heldout_preds.csv").is_file() and (fold_dir / "model" / "config.yaml").is_file():
            logger.info("fold %d: already done, reused", k)
            continue
        if cache is None:  # read and prepare every image once for all folds
            cache = [prepare_slice(load_grey(r.path), cfg.size, cfg.lung_mask) for r in records]
        train_idx, held_idx = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        start = time.perf_counter()
        net, p, held_maps = _train_fold(cache, records, train_idx, held_idx, cfg, fold_dir)
        seconds = time.perf_counter() - start
        auc = _auc(labels[held_idx], p)
        logger.info("fold %d: %d training, %d held-out images, held-out AUC %.3f, %.0f s", k, len(train_idx),
                    len(held_idx), auc, seconds)
        save_model_dir(fold_dir / "model", _fold_config(cfg, data, k, folds, seconds, command, held_maps),
                       {"model": net.state_dict()}, _fold_card(cfg, k, folds, auc, len(held_idx)))
        write_csv(fold_dir / "heldout_preds.csv", ["file", "p_covid"],
                  ([names[i], f"{pc:.6f}"] for i, pc in zip(held_idx, p)))
    done = [k for k in range(folds) if (out_dir / f"fold{k}" / "heldout_preds.csv").is_file()]
    if len(done) < folds:
        logger.info("folds done: %s of %d; run again without --only-fold (or with the rest) for the summary", done,
                    folds)
        return {"folds_done": done}
    return _summarise(out_dir, data, cfg, records, names, groups, fold, fold_seed, reference, n_boot, command)


def _summarise(out_dir: Path, data: str | os.PathLike, cfg: SliceTrainConfig, records: list[SliceRecord],
               names: list[str], groups: list[str], fold: np.ndarray, fold_seed: int,
               reference: str | os.PathLike | None, n_boot: int, command: str | None) -> dict[str, Any]:
    labels = np.array([r.label for r in records])
    folds = int(fold.max()) + 1
    p = np.full(len(names), np.nan)
    index = {n: i for i, n in enumerate(names)}
    seconds = []
    for k in range(folds):
        with open(out_dir / f"fold{k}" / "heldout_preds.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                if row["file"] not in index or fold[index[row["file"]]] != k:
                    raise ConfigError(f"{out_dir}/fold{k}: its held-out images are not this run's fold {k}; the "
                                      "data or the fold seed changed: use a new output folder")
                p[index[row["file"]]] = float(row["p_covid"])
        seconds.append(float(load_slice_model(out_dir / f"fold{k}" / "model")[1]["training"]["seconds"]))
    if np.isnan(p).any():
        raise ConfigError(f"{out_dir}: {int(np.isnan(p).sum())} images have no out-of-fold prediction")
    figures = _cv_figures(labels, p, fold, groups, n_boot, cfg.seed)
    figures["training_seconds"] = {"per_fold": seconds, "total": round(sum(seconds), 1)}
    figures["recipe"] = _recipe(cfg)
    thresholds = np.array(figures["nested_thresholds"])
    nested_pred = (p >= thresholds[fold]).astype(int)
    write_csv(out_dir / "oof_preds.csv", ["file", "label", "group", "fold", "p_covid", "threshold", "predicted"],
              ([n, BINARY_CLASS_NAMES[y], g, k, f"{pc:.6f}", f"{thresholds[k]:.6f}", BINARY_CLASS_NAMES[q]]
               for n, y, g, k, pc, q in zip(names, labels, groups, fold, p, nested_pred)))
    if reference is not None:  # reads this run's oof_preds.csv
        figures["vs_reference"] = compare_cv_runs(out_dir, reference, n_boot, cfg.seed)
    atomic_write_text(out_dir / "cv_metrics.json", json.dumps(figures, indent=2) + "\n")
    curves = []
    for k in range(folds):
        fpr, tpr, _ = roc_curve(labels[fold == k], p[fold == k])
        curves.append(RocCurve(fpr, tpr, f"fold {k} (n={int((fold == k).sum())})", auc=figures["fold_auc"][k],
                               style=":"))
    fpr, tpr, _ = roc_curve(labels, p)
    curves.append(RocCurve(fpr, tpr, "pooled out-of-fold", auc=figures["auc"]["value"],
                           auc_ci=tuple(figures["auc"]["cluster_ci"]), color="black"))
    plot_roc(out_dir / "roc.png", curves, title=f"Out-of-fold ROC, {folds}-fold grouped CV (COVID-19 positive)")
    plot_confusion(out_dir / "confusion.png", confusion_matrix(labels, nested_pred, labels=[0, 1]), BINARY_CLASS_NAMES,
                   title="Out-of-fold, nested Youden thresholds")
    _write_ensemble(out_dir, data, cfg, figures, records, folds, fold_seed, command)
    a, acc, f1 = figures["auc"], figures["accuracy_nested"], figures["f1_nested"]
    logger.info("OOF AUC %.3f (cluster CI %.3f-%.3f), accuracy %.3f, F1 %.3f at nested thresholds; %.0f s training",
                a["value"], *a["cluster_ci"], acc["value"], f1["value"], figures["training_seconds"]["total"])
    return figures


def _recipe(cfg: SliceTrainConfig) -> dict[str, Any]:
    keys = ("arch", "width", "size", "lung_mask", "source_aug", "epochs", "batch_size", "lr", "weight_decay",
            "crop_scale", "rotate_degrees", "flip", "intensity", "class_balance", "seed")
    recipe = {k: getattr(cfg, k) for k in keys}
    recipe["init"] = Path(cfg.init).name if cfg.init else None  # a basename: no absolute path in a shipped config
    return recipe


def _pct(fig: dict[str, Any]) -> str:
    return f"{100 * fig['value']:.1f} ({100 * fig['cluster_ci'][0]:.1f}-{100 * fig['cluster_ci'][1]:.1f})"


def _cam_card(scale: dict[str, Any] | None) -> str:
    if scale is None:
        return ("## Grad-CAM colour scale\nNone recorded (the maps were zero at the percentile): `predict-slice --cam` "
                "takes one from each run's images.\n")
    return f"""## Grad-CAM colour scale
`predict-slice --cam` colours evidence for COVID-19 ({scale['unit']}) up to {scale['value']:.3g}, the
{scale['percentile']:g}th percentile of this ensemble's maps on its {scale['n_images']} out-of-fold images, from
{100 * scale['show_from']:g}% of that ({scale['show_from'] * scale['value']:.3g}) up (`cam_scale` in `config.yaml`).
"""


def _write_ensemble(out_dir: Path, data: str | os.PathLike, cfg: SliceTrainConfig, figures: dict[str, Any],
                    records: list[SliceRecord], folds: int, fold_seed: int, command: str | None) -> None:
    members = [load_slice_model(out_dir / f"fold{k}" / "model") for k in range(folds)]
    ensemble = SliceEnsemble([m for m, _ in members]).eval()
    cam_scale = recorded_cam_scale(lambda: oof_cam_scale(ensemble, records, cfg.size, cfg.lung_mask, Path(data).name))
    threshold = figures["pooled_youden_threshold"]
    expected = {"auc": figures["auc"]["value"], "auc_cluster_ci": figures["auc"]["cluster_ci"],
                "auc_delong_ci": figures["auc_delong_ci"], "accuracy": figures["accuracy_nested"]["value"],
                "accuracy_cluster_ci": figures["accuracy_nested"]["cluster_ci"], "f1": figures["f1_nested"]["value"],
                "f1_cluster_ci": figures["f1_nested"]["cluster_ci"], "n": figures["n"]}
    shared = slice_model_config(cfg, f"covidctnet-slice-{cfg.arch}-{cfg.size}-cv{folds}-ensemble")
    shared["threshold"] = float(threshold)  # chosen out of fold, not the recipe's
    shared["components"]["model"]["members"] = folds
    config = {
        **shared,
        "training": {"data": Path(data).name, "command": command or "", "recipe": _recipe(cfg),
                     "seconds": figures["training_seconds"]["total"]},
        "ensemble": {"combine": "mean of the members' softmax probabilities",
                     "members": [{"path": f"fold{k}/model", "weights_sha256": cfg_k.get("weights_sha256")}
                                 for k, (_, cfg_k) in enumerate(members)]},
        "cross_validation": {"folds": folds, "fold_seed": int(fold_seed), "grouping": "source paper (COVID), figure "
                             "or run of PNG numbers (non-COVID)", "expected_performance": expected,
                             "threshold_selection": "Youden's J on all out-of-fold predictions"},
        **({"cam_scale": cam_scale} if cam_scale is not None else {}),
    }
    card = f"""# {config['name']}

COVID-19 vs non-COVID classifier for single chest CT slice images (class 1 = COVID-19): the mean of the COVID
probabilities of the {folds} fold models of a grouped {folds}-fold cross-validation (`cv-slice`). Research software,
**not a medical device**.

## Expected performance (out-of-fold, {figures['n']} images in {figures['n_groups']} source groups)
| AUC (95% cluster CI) | AUC DeLong CI | accuracy | F1 (COVID) |
|---|---|---|---|
| {_pct(figures['auc'])} | {100 * figures['auc_delong_ci'][0]:.1f}-{100 * figures['auc_delong_ci'][1]:.1f} | \
{_pct(figures['accuracy_nested'])} | {_pct(figures['f1_nested'])} |

Accuracy and F1 are at nested thresholds (each fold at Youden's J of the other folds). This ensemble's threshold,
{threshold:.4f}, is Youden's J on all out-of-fold predictions; at it the out-of-fold accuracy is
{_pct(figures['accuracy_pooled_youden'])} and F1 {_pct(figures['f1_pooled_youden'])} (optimistic: the threshold saw
these labels). The ensemble averages {folds} models, each trained on {folds - 1}/{folds} of the data, so its scores
on new images may be a little better than, and distributed somewhat differently from, one fold model's.

{_cam_card(cam_scale)}
## Command
```
{command or '(library call)'}
```
"""
    save_model_dir(out_dir / "model", config, {"model": ensemble.state_dict()}, card,
                   extra_files={n: out_dir / n for n in ("roc.png", "confusion.png", "cv_metrics.json")})
