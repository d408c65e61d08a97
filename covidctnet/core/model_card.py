"""Model cards with the metadata header the Hugging Face hub reads: YAML front matter between ``---`` lines.

The header (``license``, ``tags``, ``datasets``, ``metrics`` and ``model-index`` with each figure's dataset, split and
95% confidence interval) is what ``huggingface_hub.ModelCard.load`` parses into ``card.data``; it is plain YAML, so
nothing here needs ``huggingface_hub`` and nothing is uploaded. :func:`card_metadata` derives the header from a model
directory's ``config.yaml``: the figures are those of its ``validation`` mapping, and a confidence interval is given
only where ``validation.ci95`` records one (``{metric: {low, high, method}}``), never invented.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import yaml

__all__ = ["CARD_LICENSE", "METRIC_IDS", "card_metadata", "metric_label", "split_front_matter", "with_front_matter"]

CARD_LICENSE = {
    "license": "other",
    # the code is Apache-2.0, but the weights derive from data whose terms were not all verified (see each card)
    "license_name": "research-only-training-data-terms-unverified",
}

METRIC_IDS = {"auc": "roc_auc", "accuracy": "accuracy", "f1": "f1", "sensitivity": "recall",
              "specificity": "specificity", "loss": "loss", "val_psnr": "psnr", "val_ssim": "ssim"}
"""``config.yaml`` ``validation`` key -> metric type in the header (Hugging Face metric ids where one exists)."""

_NAMES = {"auc": "AUC", "accuracy": "accuracy", "f1": "F1", "sensitivity": "sensitivity",
          "specificity": "specificity", "loss": "cross-entropy", "val_psnr": "PSNR (dB)", "val_ssim": "SSIM"}

_TASKS = {
    "covidctnet": ("image-classification", "control / COVID-19 / CAP from a chest CT volume", ["3d", "chest-ct"]),
    "classifier": ("image-classification", "control / COVID-19 / CAP from a CT residual volume", ["3d", "chest-ct"]),
    "denoise": ("image-to-image", "Perlin-noise removal from control CT slices (BCDU-Net)", ["2d", "chest-ct"]),
    "slice": ("image-classification", "COVID-19 vs non-COVID from a CT slice image", ["2d", "ct-slice"]),
    "slice-encoder": ("feature-extraction", "SimCLR encoder of CT slice images", ["2d", "ct-slice", "simclr"]),
}


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(header mapping, body)`` of a card; ``({}, text)`` when it has no ``---`` header."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}, text
    header = yaml.safe_load(text[4:end]) or {}
    return (header if isinstance(header, dict) else {}), text[end + 5:].lstrip("\n")


def with_front_matter(text: str, header: Mapping[str, Any]) -> str:
    """The card ``text`` with ``header`` as its front matter (an existing header is replaced)."""
    _, body = split_front_matter(text)
    dumped = yaml.safe_dump(dict(header), sort_keys=False, allow_unicode=True, width=100)
    return f"---\n{dumped}---\n\n{body}"


def metric_label(key: str, ci: Mapping[str, Any] | None) -> str:
    """The metric's display name, with its 95% CI when recorded: ``AUC (95% CI 0.851–0.959, DeLong)``."""
    name = _NAMES.get(key, key)
    if not ci:
        return name
    method = f", {ci['method']}" if ci.get("method") else ""
    return f"{name} (95% CI {float(ci['low']):.3f}–{float(ci['high']):.3f}{method})"


def _datasets(config: Mapping[str, Any]) -> list[str]:
    """Names (last path part) of the data sets recorded in ``training`` / ``threshold_selection`` / members."""
    sources = [config.get("training") or {}, config.get("threshold_selection") or {}]
    sources += [m.get("training") or {} for m in (config.get("ensemble") or {}).get("members") or []]
    names = []
    for src in sources:
        for key in ("data", "data_dir"):
            if isinstance(src.get(key), str) and src[key]:
                name = PurePath(src[key]).name
                if name not in names:
                    names.append(name)
    return names


def card_metadata(config: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The card header of a model directory from its ``config.yaml`` mapping.

    Args:
        config: the ``config.yaml`` mapping (current schema).
        name: the model's name when ``config`` records none.

    Returns:
        ``license``, ``license_name``, ``library_name``, ``tags``, ``datasets`` (when the training data is
        recorded), ``metrics`` and ``model-index`` (when ``validation`` holds figures; split ``validation``).
    """
    task = config.get("task") or "classifier"
    hf_task, task_name, task_tags = _TASKS.get(task, _TASKS["classifier"])
    model_name = config.get("name") or name or "covidctnet-model"
    header: dict[str, Any] = {
        **CARD_LICENSE,
        "library_name": "covidctnet",
        "tags": ["covidctnet", "monai", "medical-imaging", "covid-19", *task_tags, "research-only",
                 "not-a-medical-device"],
    }
    datasets = _datasets(config)
    if datasets:
        header["datasets"] = datasets
    # a cross-validated model's expected performance is its out-of-fold estimate; otherwise the validation split's
    cv = config.get("cross_validation") or {}
    if cv.get("expected_performance"):
        validation = cv["expected_performance"]
        ci95 = {k: {"low": validation[f"{k}_cluster_ci"][0], "high": validation[f"{k}_cluster_ci"][1],
                    "method": "bootstrap over source groups"} for k in METRIC_IDS if f"{k}_cluster_ci" in validation}
        split, what = "out-of-fold", f"out-of-fold, grouped {cv.get('folds', 'K')}-fold cross-validation"
    else:
        validation = config.get("validation") or {}
        ci95 = validation.get("ci95") or {}
        split, what = "validation", "validation split"
    figures = [(k, float(v)) for k, v in validation.items()
               if k in METRIC_IDS and isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
    if figures:
        header["metrics"] = list(dict.fromkeys(METRIC_IDS[k] for k, _ in figures))
        n = validation.get("n")
        dataset = datasets[0] if datasets else "unrecorded"
        caveat = "used for model selection: optimistic" if split == "validation" else "an estimate for new sources"
        header["model-index"] = [{"name": model_name, "results": [{
            "task": {"type": hf_task, "name": task_name},
            "dataset": {"type": dataset, "split": split,
                        "name": f"{dataset} {what}" + (f" (n={int(n)}; " if n else " (") + caveat + ")"},
            "metrics": [{"type": METRIC_IDS[k], "value": v, "name": metric_label(k, ci95.get(k))}
                        for k, v in figures],
        }]}]
    return header
