"""``covidctnet ensemble-slice``: one slice model directory from several trained ones, averaging their probabilities.

Slice models trained on a few hundred images vary a lot from seed to seed (on the UCSD validation split the AUC of
one recipe moves by several points between seeds and between neighbouring epochs). Averaging the members' COVID
probabilities lowers that variance, which is what matters on images none of them has seen. The result is an ordinary
slice model directory (``components.model.members: N``, one safetensors file, :class:`~covidctnet.models.slice
.SliceEnsemble`), so ``predict-slice``, ``--cam``, ``--backend onnx`` and ``export-onnx`` take it unchanged.

The members must share architecture, width, input channels and preprocessing (e.g. the same ``train-slice`` recipe
with different ``--seed``). With ``data``, the ensemble is scored on the validation split and the figures go into
``config.yaml`` and the model card, with each member's own figures for comparison; the members were selected on that
split, so these figures are optimistic. ``threshold="youden"`` also sets the ensemble's decision threshold on that split
(:func:`~covidctnet.training.slice.youden_threshold`); the figures at 0.5 are kept beside it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError
from covidctnet.core.model_dir import save_model_dir
from covidctnet.data.ucsd import SliceDataset, find_records
from covidctnet.models.registry import load_slice_model
from covidctnet.models.slice import SliceEnsemble
from covidctnet.training.slice import (
    dataset_cam_scale,
    recorded_cam_scale,
    slice_metrics,
    write_slice_val_outputs,
    youden_threshold,
)
from covidctnet.training.trainer import predict_dataset

__all__ = ["ensemble_slice_models"]

logger = logging.getLogger(__name__)

_SAME = ("arch", "kwargs")


def _member_row(name: str, metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return f"| {name} | | | | |"
    return (f"| {name} | {100 * metrics['accuracy']:.1f}% | {100 * metrics['f1']:.1f} | {100 * metrics['auc']:.1f} | "
            f"{int(metrics.get('n', 0))} |")


def _check_threshold(threshold: float | str | None, data: str | os.PathLike | None) -> None:
    """Refuse a threshold that is not a number in (0, 1), ``"youden"`` (with ``data``) or ``None``.

    Raises:
        ConfigError: the threshold is bad, or ``"youden"`` comes without ``data``.
    """
    if threshold == "youden" and data is None:
        raise ConfigError("threshold 'youden' is chosen on a validation split: give --data")
    if threshold is not None and threshold != "youden" and not (isinstance(threshold, float) and 0 < threshold < 1):
        raise ConfigError(f"threshold must be a number in (0, 1) or 'youden', not {threshold!r}")


def _load_members(model_dirs: Sequence[str | os.PathLike],
                  threshold: float | str | None) -> list[tuple[Any, dict[str, Any]]]:
    """Load the member models on the CPU and check that they can be averaged.

    Args:
        model_dirs: the members' model directories; the first is the reference the others are compared with.
        threshold: the ensemble's own threshold; with ``None`` the members must also share theirs.

    Returns:
        ``(model, config)`` of each member, in order.

    Raises:
        ConfigError: a member is an ensemble, or differs from the first in architecture, preprocessing or (when the
            ensemble sets none) threshold.
    """
    loaded = [load_slice_model(d, "cpu") for d in model_dirs]
    ref_dir, (_, ref) = model_dirs[0], loaded[0]
    ref_comp = ref["components"]["model"]
    for path, (_, cfg) in zip(model_dirs, loaded):
        comp = cfg["components"]["model"]
        if "members" in comp:
            raise ConfigError(f"{path}: already an ensemble; list its own members instead")
        diff = [k for k in _SAME if comp.get(k) != ref_comp.get(k)]
        diff += ["preprocess"] if cfg.get("preprocess") != ref.get("preprocess") else []
        diff += ["threshold"] if threshold is None and cfg.get("threshold", 0.5) != ref.get("threshold", 0.5) else []
        if diff:
            raise ConfigError(f"{path}: differs from {ref_dir} in {', '.join(diff)}; ensemble members must share "
                              "architecture and preprocessing (and the threshold, unless the ensemble sets its own)")
    return loaded


def _ensemble_config(model_dirs: Sequence[str | os.PathLike], loaded: list[tuple[Any, dict[str, Any]]],
                     threshold: float | str, command: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ensemble's ``config.yaml`` (before any validation figures) and the record of its members.

    Args:
        model_dirs: the members' model directories.
        loaded: ``(model, config)`` of each member (:func:`_load_members`).
        threshold: the ensemble's threshold, or ``"youden"`` until it is chosen.
        command: the command line.

    Returns:
        ``(config, members)``; ``members`` is also ``config["ensemble"]["members"]``.
    """
    ref = loaded[0][1]
    ref_comp = ref["components"]["model"]
    members = [{"path": str(d), "name": cfg.get("name"), "weights_sha256": cfg.get("weights_sha256"),
                "training": cfg.get("training"), "validation": cfg.get("validation")}
               for d, (_, cfg) in zip(model_dirs, loaded)]
    config: dict[str, Any] = {
        "name": f"{ref.get('name', 'covidctnet-slice')}-ensemble{len(loaded)}",
        "task": "slice",
        "class_names": ref.get("class_names"),
        "positive_class": ref.get("positive_class", "covid"),
        "threshold": threshold,
        "components": {"model": {"arch": ref_comp["arch"], "kwargs": ref_comp.get("kwargs", {}),
                                 "members": len(loaded)}},
        "preprocess": ref["preprocess"],
        "ensemble": {"combine": "mean of the members' softmax probabilities", "command": command or "",
                     "members": members},
    }
    return config, members


def _score_on_val(ensemble: SliceEnsemble, config: dict[str, Any], data: str | os.PathLike, device: str,
                  tmp: Path) -> tuple[dict[str, float], dict[str, Path]]:
    """Score the ensemble on ``data``'s val split and record the figures in ``config``.

    Sets ``config["threshold"]`` (and ``threshold_selection``) when it is ``"youden"``, ``config["validation"]``
    and, when the maps show any evidence, ``config["cam_scale"]``.

    Args:
        ensemble: the ensemble model (moved to ``device``).
        config: the ensemble's config (:func:`_ensemble_config`); updated in place.
        data: a UCSD or folder-per-class dataset.
        device: where to score.
        tmp: a folder for ``val_preds.csv``, ``roc.png`` and ``confusion.png``.

    Returns:
        ``(metrics, extra_files)``: the validation metrics at the ensemble's threshold, and the files written in
        ``tmp`` by name, for the model directory.
    """
    pre = config["preprocess"]
    chosen = config["threshold"]
    val = SliceDataset(find_records(data, "val"), pre["size"], pre["lung_mask"], None)
    dev = resolve_device(device)
    probs = predict_dataset(ensemble.to(dev), val, dev)
    if chosen == "youden":
        chosen = youden_threshold(val.labels, probs[:, 1])
        at_half = slice_metrics(val.labels, probs[:, 1], 0.5)
        config["threshold"] = chosen
        config["threshold_selection"] = {
            "method": "Youden's J on the validation split", "data": str(data), "n": len(val),
            "validation_at_0.5": {k: float(v) for k, v in at_half.items()}}
        logger.info("threshold %.4f by Youden's J on %s val (n=%d)", chosen, data, len(val))
    metrics = write_slice_val_outputs(tmp, val, probs, chosen)
    config["validation"] = {k: float(v) for k, v in metrics.items()}
    # the colour range of predict-slice --cam, from the images the ensemble is scored on
    scale = recorded_cam_scale(lambda: dataset_cam_scale(ensemble, val, "validation split",
                                                         f"{Path(data).name} val", dev))
    if scale is not None:
        config["cam_scale"] = scale
    extra = {name: tmp / name for name in ("val_preds.csv", "roc.png", "confusion.png") if (tmp / name).is_file()}
    logger.info("ensemble of %d on %s val: accuracy %.3f, F1 %.3f, AUC %.3f (n=%d)",
                config["components"]["model"]["members"], data, metrics["accuracy"], metrics["f1"], metrics["auc"],
                metrics["n"])
    return metrics, extra


def ensemble_slice_models(
    model_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    device: str = "auto",
    command: str | None = None,
    threshold: float | str | None = None,
) -> dict[str, Any]:
    """Combine slice model directories into one ensemble model directory.

    Args:
        model_dirs: two or more ``train-slice`` model directories (``RUN/model``) of the same architecture and
            preprocessing; ensembles are not nested.
        out_dir: the new model directory (written atomically; replaced if it exists).
        data: a UCSD or folder-per-class dataset whose ``val`` split scores the ensemble (optional). With it,
            ``val_preds.csv``, ``roc.png`` and ``confusion.png`` are written into ``out_dir`` as well.
        device: where to score the validation split.
        command: the command line, recorded in ``config.yaml`` and the card.
        threshold: the ensemble's decision threshold: a number in (0, 1), ``"youden"`` (chosen on ``data``'s val
            split by Youden's J; needs ``data``) or ``None`` (the members' shared threshold).

    Returns:
        ``{"model_dir": Path, "members": int, "val": metrics or None, "threshold": float}``.

    Raises:
        ConfigError: fewer than two members, members that differ in architecture or preprocessing, or a bad
            threshold (``"youden"`` without ``data``).
        ModelDirError: a member is not a slice model directory.
    """
    if len(model_dirs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 model directories, not {len(model_dirs)}")
    _check_threshold(threshold, data)
    loaded = _load_members(model_dirs, threshold)
    ensemble = SliceEnsemble([m for m, _ in loaded]).eval()
    chosen = float(loaded[0][1].get("threshold", 0.5)) if threshold is None else threshold
    config, members = _ensemble_config(model_dirs, loaded, chosen, command)
    metrics = None
    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Path] = {}
        if data is not None:
            metrics, extra = _score_on_val(ensemble, config, data, device, Path(tmp))
        else:
            logger.info("no --data: no Grad-CAM colour scale recorded; predict-slice --cam sets one from the images "
                        "of each run (covidctnet calibrate-cam records one)")
        card = _card(config, members, metrics, data, command)
        save_model_dir(out_dir, config, {"model": ensemble.cpu().state_dict()}, card, extra_files=extra)
    return {"model_dir": Path(out_dir), "members": len(loaded), "val": metrics, "threshold": float(config["threshold"])}


def _card(config: dict[str, Any], members: list[dict[str, Any]], metrics: dict[str, float] | None,
          data: str | os.PathLike | None, command: str | None) -> str:
    comp = config["components"]["model"]
    rows = "\n".join(_member_row(f"member {i} ({m['path']})", m.get("validation")) for i, m in enumerate(members))
    ens = _member_row("**ensemble**", metrics) if metrics else "| ensemble | not scored (no --data) | | | |"
    selection = config.get("threshold_selection")
    if selection:
        ens += "\n" + _member_row("ensemble at threshold 0.5", selection["validation_at_0.5"])
    rule = (f"Threshold: COVID when `p_covid >= {config['threshold']:.4f}`, chosen on this validation split by "
            "Youden's J (sensitivity + specificity - 1), so the figures at it are optimistic twice over; the row at "
            "0.5 is beside it." if selection else f"Threshold: COVID when `p_covid >= {config['threshold']}`.")
    return f"""# {config['name']}

COVID-19 vs non-COVID classifier for single chest CT slice images (class 1 = COVID-19): the mean of the COVID
probabilities of {len(members)} `{comp['arch']}` models of one recipe. Research software, **not a medical device**.

## Command
```
{command or '(library call)'}
```

## Validation figures ({data or 'no data given'}; the members' epochs were chosen on this split: optimistic)
| model | accuracy | F1 (COVID) | AUC | n |
|---|---|---|---|---|
{rows}
{ens}

{rule} Each member's own card, training command and data are recorded under `ensemble.members` in `config.yaml`.
"""
