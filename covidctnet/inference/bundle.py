"""``covidctnet export-bundle``: a model directory as a MONAI bundle.

Layout (MONAI bundle specification)::

    BUNDLE/
      configs/metadata.json    # version, changelog, library versions, task, inputs/outputs, intended use, license
      configs/inference.json   # components: covidctnet's own classes (BundlePredictor); output_dir below bundle_root
      configs/logging.conf     # what `monai.bundle run` logs: covidctnet's per-study lines on stdout
      models/                  # the covidctnet model directory (config.yaml, *.safetensors, SHA256SUMS, card …)
      docs/README.md           # the model card, with its Hugging Face metadata header

Run from the bundle folder (``bundle_root`` is ``.``, as in the MONAI model zoo; ``--bundle_root DIR`` runs it from
elsewhere)::

    python -m monai.bundle run --config_file configs/inference.json --input CT.nii.gz

which writes ``eval/report.csv`` and ``eval/report.json`` (``eval/preds.csv`` for a slice model) exactly as
``covidctnet predict`` (``predict-slice``) does: :class:`BundlePredictor` calls the same library function on the
bundled model directory, so the probabilities are the CLI's. The weights are copied unchanged; a ``config.yaml`` that
records absolute paths is rewritten with relative ones (:func:`~covidctnet.core.model_dir.portable_paths`) and its
``SHA256SUMS`` line renewed, so no shipped file names a folder of the machine that trained the model.

``configs/metadata.json`` names MONAI's metadata schema by its usual URL; :func:`verify_bundle` checks it with
``monai.bundle.verify_metadata`` against the copy shipped in ``covidctnet/assets/monai`` (given as ``filepath``, so
nothing is downloaded).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.bundle import ConfigParser, verify_metadata

from covidctnet.core.errors import ConfigError, InputError, ModelDirError
from covidctnet.core.files import atomic_dir, sha256_file
from covidctnet.core.labels import BINARY_CLASS_NAMES, CLASS_NAMES
from covidctnet.core.model_card import card_metadata, split_front_matter, with_front_matter
from covidctnet.core.model_dir import (
    CARD_NAME,
    CONFIG_NAME,
    SUMS_NAME,
    TEXT_SUFFIXES,
    absolute_paths,
    classifier_grid,
    load_model_dir,
    portable_paths,
    sums_sha256,
)
from covidctnet.inference.predict import PredictConfig, load_pipeline, predict_studies
from covidctnet.inference.predict_slice import predict_slices
from covidctnet.models.registry import ASSETS, load_slice_model

__all__ = ["BUNDLE_SCHEMA_URL", "SCHEMA_FILE", "SCHEMA_MD5", "BundleExport", "BundlePredictor", "export_bundle", "verify_bundle"]

logger = logging.getLogger(__name__)

BUNDLE_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                     "meta_schema_20240725.json")
"""The metadata schema MONAI's model-zoo bundles name (``schema`` in ``metadata.json``)."""
SCHEMA_FILE = ASSETS / "monai" / "meta_schema_20240725.json"
"""A copy of :data:`BUNDLE_SCHEMA_URL`, so bundles are verified offline."""
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
"""md5 of :data:`SCHEMA_FILE`, which ``verify_metadata`` checks before it uses the file."""

_LOGGING_CONF = """[loggers]
keys=root,covidctnet

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=WARNING
handlers=console

[logger_covidctnet]
level=INFO
handlers=
qualname=covidctnet

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(levelname)s %(name)s: %(message)s
"""


@dataclass
class BundlePredictor:
    """What a bundle's ``inference.json`` runs: ``covidctnet predict`` (``predict-slice`` for a slice model) on the
    bundled model directory.

    Attributes:
        bundle_root: the bundle folder; its ``models/`` is the model directory.
        task: ``covidctnet`` (a CT volume or DICOM series → ``report.csv`` / ``report.json``) or ``slice`` (slice
            images → ``preds.csv``).
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        batch_size: slices per denoiser pass (CT) or images per pass (slice).
    """

    bundle_root: str
    task: str = "covidctnet"
    device: str = "cpu"
    batch_size: int = 8

    def __call__(self, inputs: str | os.PathLike | list[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
        """Predict ``inputs`` (a file or folder, or a list of them) into ``output_dir`` (relative: below
        ``bundle_root``).

        Returns:
            The report written (``report.csv`` or ``preds.csv``).

        Raises:
            InputError: no input given, or a study/image failed (its one-line error is named).
        """
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        model_dir, output_dir = Path(self.bundle_root) / "models", Path(self.bundle_root) / output_dir
        if not items or any(str(i) == "" for i in items):
            raise InputError("no input: pass --input FILE_OR_FOLDER to `python -m monai.bundle run`")
        if self.task == "slice":
            summary = predict_slices(items, output_dir, model_dir, device=self.device,
                                     batch_size=self.batch_size)
            if summary.n_failed:
                raise InputError(f"{output_dir}: {summary.n_failed} image(s) failed; see {summary.out_csv}")
            return summary.out_csv
        cfg = PredictConfig(batch_size=self.batch_size, device=self.device)
        batch = predict_studies(items, model_dir, output_dir, cfg, resume=False)
        if batch.n_failed:
            raise InputError("; ".join(batch.errors))
        return output_dir / "report.csv"


@dataclass
class BundleExport:
    """What :func:`export_bundle` wrote."""

    out_dir: Path
    task: str
    weights_sha256: str
    rewritten: list[str]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _kind(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """``(bundle task, config)`` of a predict (denoiser + 3D classifier) or slice model directory, loading its
    networks once so that a directory ``predict`` would refuse is refused here, before anything is written."""
    md = load_model_dir(model_dir)
    if md.config.get("task") == "slice":
        load_slice_model(model_dir, "cpu")
        return "slice", md.config
    comps = md.config.get("components", {})
    if "denoiser" not in comps or "classifier" not in comps:
        raise ModelDirError(f"{model_dir}: a bundle needs a predict model directory (denoiser + classifier) or a "
                            f"slice model directory; this one has {sorted(comps)} (task {md.config.get('task')!r})")
    load_pipeline(model_dir, "cpu")
    return "covidctnet", md.config


def _network_formats(task: str, config: dict[str, Any]) -> dict[str, Any]:
    """``network_data_format`` (the whole chain: what ``run`` reads and writes) and one ``<name>_data_format`` per
    network, in MONAI's tensor description."""
    if task == "slice":
        size = int((config.get("preprocess") or {}).get("size", 256))
        kwargs = config["components"]["model"].get("kwargs") or {}
        return {"network_data_format": {
            "inputs": {"image": {"type": "image", "format": "grey", "modality": "CT slice image (PNG/JPG)",
                                 "num_channels": int(kwargs.get("in_channels", 1)), "spatial_shape": [size, size],
                                 "dtype": "float32", "value_range": [], "is_patch_data": False,
                                 "channel_def": {"0": "z-scored slice", "1": "lung mask"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 2,
                                 "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
                                 "channel_def": {str(i): c for i, c in
                                                 enumerate(config.get("class_names") or BINARY_CLASS_NAMES)}}},
        }}
    pre = config.get("preprocess") or {}
    depth, size, _ = classifier_grid(config)  # the grid the directory records (predict checked it agrees)
    probs = {"type": "probabilities", "format": "classes", "num_channels": len(CLASS_NAMES), "spatial_shape": [1],
             "dtype": "float32", "value_range": [0, 1],
             "channel_def": {str(i): c for i, c in enumerate(config.get("class_names") or CLASS_NAMES)}}
    return {
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": ["*", "*", "*"], "dtype": "float32",
                                 "value_range": [-1024, 3071], "is_patch_data": False,
                                 "channel_def": {"0": "chest CT (NIfTI, NRRD, MetaImage or a DICOM series folder)"}}},
            "outputs": {"pred": probs},
        },
        "denoiser_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1,
                                 "spatial_shape": [size, size], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {"0": f"axial slice, HU window [{pre.get('hu_min')}, "
                                                      f"{pre.get('hu_max')}] scaled to [0, 1]"}}},
            "outputs": {"pred": {"type": "image", "format": "magnitude", "num_channels": 1,
                                 "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1],
                                 "channel_def": {"0": "denoised slice"}}},
        },
        "classifier_data_format": {
            "inputs": {"image": {"type": "image", "format": "residual", "num_channels": 1,
                                 "spatial_shape": [depth, size, size], "dtype": "float32", "value_range": [-1, 1],
                                 "is_patch_data": False,
                                 "channel_def": {"0": "residual = preprocessed slice - denoised slice"}}},
            "outputs": {"pred": {**probs, "type": "logits", "value_range": []}},
        },
    }


def _metadata(task: str, config: dict[str, Any], header: dict[str, Any], bundle_version: str, sums_sha: str,
              source_sums_sha: str) -> dict[str, Any]:
    classes = config.get("class_names") or (BINARY_CLASS_NAMES if task == "slice" else CLASS_NAMES)
    eval_metrics = {f"{r['dataset'].get('split', '')}: {m.get('name', m['type'])}": m["value"]
                    for entry in header.get("model-index") or [] for r in entry.get("results") or []
                    for m in r.get("metrics") or []}
    if task == "slice":
        what = "COVID-19 vs non-COVID from a chest CT slice image (PNG/JPG)"
        description = ("A covidctnet slice model: the slice image and its classical lung mask through a 2D network "
                       "(or the mean of an ensemble's); p_covid against the model's threshold gives the call.")
    else:
        what = "control / COVID-19 / community-acquired pneumonia from a chest CT volume"
        description = ("CovidCTNet (Javaheri et al., npj Digit. Med. 4, 29 (2021)) as covidctnet runs it: the CT is "
                       "preprocessed, each axial slice is denoised by a BCDU-Net trained on control scans only, and "
                       "a 3D CNN classifies the stack of residuals (slice - denoised slice).")
    return {
        "schema": BUNDLE_SCHEMA_URL,
        "version": bundle_version,
        "changelog": {bundle_version: f"exported by covidctnet {_package_version('covidctnet')} from model {config.get('name')} "
                                      f"(SHA256SUMS sha256 {source_sums_sha[:12]}…)"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__,
        "numpy_version": np.__version__,
        "required_packages_version": {name: _package_version(name) for name in
                                      ("covidctnet", "nibabel", "safetensors", "pyyaml", "scikit-image")},
        "supported_apps": {},
        "name": str(config.get("name")),
        "task": what,
        "description": description,
        "authors": "covidctnet contributors",
        "copyright": "Copyright (c) covidctnet contributors; code under Apache-2.0, weights under the terms in "
                     "docs/README.md",
        "data_source": ", ".join(header.get("datasets") or []) or "not recorded",
        "data_type": "png" if task == "slice" else "nibabel",
        "image_classes": "one-channel grey-scale slice image" if task == "slice"
        else "one-channel chest CT in Hounsfield units",
        "pred_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(classes)),
        "eval_metrics": eval_metrics,
        "intended_use": "Research only: not a medical device, not for diagnosis or any clinical decision. See "
                        "docs/README.md for the data, the figures and their limits.",
        "references": [("Javaheri T. et al., CovidCTNet: an open-source deep learning approach to diagnose covid-19 "
                        "using small cohort of CT images, npj Digital Medicine 4, 29 (2021)")],
        "license": f"{header.get('license')} ({header.get('license_name', '')})",
        "covidctnet": {"model_task": config.get("task"), "weights_sha256": sums_sha,
                       "source_weights_sha256": source_sums_sha,
                       "note": "weights_sha256 is the sha256 of models/SHA256SUMS, the model identity "
                               "covidctnet reports"},
        **_network_formats(task, config),
    }


def _inference(task: str) -> dict[str, Any]:
    return {
        "bundle_root": ".",
        "input": "",
        "output_dir": "eval",
        "device": "cpu",
        "batch_size": 16 if task == "slice" else 8,
        "predictor": {"_target_": "covidctnet.inference.bundle.BundlePredictor", "bundle_root": "@bundle_root",
                      "task": task, "device": "@device", "batch_size": "@batch_size"},
        "run": ["$@predictor(@input, @output_dir)"],
    }


def _copy_model_dir(src: Path, dst: Path) -> list[str]:
    """Copy a model directory, its text files made portable; renew ``SHA256SUMS`` for a rewritten ``config.yaml``.

    Returns:
        The names of the files rewritten.
    """
    dst.mkdir()
    rewritten = []
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        if path.suffix.lower() in TEXT_SUFFIXES and absolute_paths(path.read_text()):
            (dst / path.name).write_text(portable_paths(path.read_text()))
            rewritten.append(path.name)
        else:
            shutil.copyfile(path, dst / path.name)
    if CONFIG_NAME in rewritten:
        lines = []
        for line in (src / SUMS_NAME).read_text().splitlines():
            digest, _, name = line.partition("  ")
            lines.append(f"{sha256_file(dst / name) if name == CONFIG_NAME else digest}  {name}\n")
        (dst / SUMS_NAME).write_text("".join(lines))
    load_model_dir(dst)  # the copy's hashes hold
    return rewritten


def export_bundle(model_dir: str | os.PathLike, out_dir: str | os.PathLike, bundle_version: str = "0.1.0",
                  verify: bool = True) -> BundleExport:
    """Write a model directory as a MONAI bundle (see the module docstring for the layout).

    Args:
        model_dir: a predict model directory (denoiser + 3D classifier) or a slice model directory.
        out_dir: the bundle folder to write (atomically); an earlier bundle there is replaced, any other non-empty
            folder is refused.
        bundle_version: the bundle's ``version`` in ``metadata.json``.
        verify: check the written ``metadata.json`` against MONAI's schema and parse ``inference.json``
            (:func:`verify_bundle`) before the bundle is put in place.

    Raises:
        ModelDirError: not a usable predict or slice model directory.
        ConfigError: ``out_dir`` is ``model_dir`` or an unrelated non-empty folder, or the metadata fails the schema.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError(f"{out_dir}: -o must differ from MODEL_DIR (the export would replace the source model)")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / "configs" / "metadata.json").is_file())):
        raise ConfigError(f"{out_dir}: exists and is not an earlier bundle (configs/metadata.json missing); choose a "
                          "new or empty folder")
    task, config = _kind(model_dir)
    source_sums = sums_sha256(model_dir)
    card = (model_dir / CARD_NAME).read_text() if (model_dir / CARD_NAME).is_file() else f"# {config.get('name')}\n"
    header, body = split_front_matter(portable_paths(card))
    header = header or card_metadata(config, model_dir.name)
    with atomic_dir(out_dir) as tmp:
        rewritten = _copy_model_dir(model_dir, tmp / "models")
        sums = sums_sha256(tmp / "models")
        (tmp / "configs").mkdir()
        meta = _metadata(task, load_model_dir(tmp / "models").config, header, bundle_version, sums, source_sums)
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        (tmp / "configs" / "inference.json").write_text(json.dumps(_inference(task), indent=2) + "\n")
        (tmp / "configs" / "logging.conf").write_text(_LOGGING_CONF)
        (tmp / "docs").mkdir()
        usage = (f"\n\n---\n\n## Running this MONAI bundle\nFrom this folder: `python -m monai.bundle run --config_file "
                 f"configs/inference.json --input {'SLICE.png' if task == 'slice' else 'CT.nii.gz'}` writes "
                 f"`eval/{'preds.csv' if task == 'slice' else 'report.csv'}` as `covidctnet "
                 f"{'predict-slice' if task == 'slice' else 'predict'} --model models` does (covidctnet must be "
                 "installed). `models/` is the covidctnet model directory itself.\n")
        (tmp / "docs" / "README.md").write_text(with_front_matter(body.rstrip("\n") + usage, header))
        if verify:
            verify_bundle(tmp)
    if rewritten:
        logger.info("%s: absolute paths made relative in %s", out_dir, ", ".join(rewritten))
    logger.info("%s: MONAI bundle of %s (%s)", out_dir, config.get("name"), task)
    return BundleExport(out_dir, task, sums, rewritten)


def verify_bundle(bundle: str | os.PathLike) -> None:
    """Check a bundle: ``metadata.json`` against MONAI's schema with ``monai.bundle.verify_metadata`` (the shipped
    copy :data:`SCHEMA_FILE` is passed as ``filepath``, so MONAI finds it and downloads nothing), ``inference.json``
    parses with ``monai.bundle.ConfigParser``, and no file under ``configs/`` or ``models/`` names an absolute path.

    Raises:
        ConfigError: the metadata fails the schema (jsonschema's message), a config does not parse, or an absolute
            path is found. ``jsonschema`` missing (``pip install covidctnet[bundle]``) is an error too.
    """
    bundle = Path(bundle)
    meta = bundle / "configs" / "metadata.json"
    try:
        verify_metadata(meta_file=str(meta), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5, hash_type="md5")
    except ValueError as err:
        raise ConfigError(f"{meta}: {' '.join(str(err).split())[:300]}") from err
    except ImportError as err:  # monai's OptionalImportError: jsonschema is not installed
        raise ConfigError(f"{meta}: cannot verify the metadata ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          "install covidctnet[bundle] for jsonschema") from err
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(meta))
    if "run" not in parser or "predictor" not in parser:
        raise ConfigError(f"{bundle / 'configs' / 'inference.json'}: no 'run' or 'predictor' entry")
    found = [f"{p.relative_to(bundle)}: {a}" for folder in ("configs", "models")
             for p in sorted((bundle / folder).iterdir()) if p.suffix.lower() in TEXT_SUFFIXES
             for a in absolute_paths(p.read_text())]
    if found:
        raise ConfigError(f"{bundle}: absolute paths in shipped files: {'; '.join(found[:3])}")
