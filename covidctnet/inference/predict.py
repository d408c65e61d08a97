"""End-to-end prediction: raw CT → preprocess → denoise → residual → 3D CNN → report.

A model directory for ``predict`` holds two components, ``denoiser`` (BCDU-Net) and ``classifier`` (3D CNN), and
records the preprocessing its denoiser was trained with (``config.yaml: preprocess``) and the residual grid its
classifier takes (the classifier's ``input_size``). ``predict`` applies exactly that preprocessing, so a model trained
on 128×128 official-profile volumes is never fed 240×240 default-profile ones.

Outputs (``OUT/``): ``report.csv`` (``study_id, p_control, p_covid, p_cap, predicted, status, error, model,
weights_sha256``), ``report.json`` (the same plus the input checks passed and the seconds per step), ``report.html``
(one self-contained page with a row per study: call, probability bars, overlay, checks, seconds or error), and with
``save_residuals`` ``<study_id>_residual.nii.gz`` and ``<study_id>_overlay.png`` per study (without it, a small
overlay for the page, ``previews/<study_id>.png``). With ``dicom_out``, a DICOM SR and Segmentation per DICOM study go
to that folder (:mod:`covidctnet.inference.dicom_export`), and with a ``store_to`` target to a PACS
(:mod:`covidctnet.io.dicomweb`). As the other batch stages,
``predict`` keeps ``manifest.csv`` and one ``predictions/<study_id>.json`` per study as it goes, so a rerun (or a run
killed half-way) skips the studies already predicted (the manifest records each study's model hash and precision, and
a folder of another model is refused).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidctnet.core.errors import ConfigError, CovidCTNetError, ModelDirError
from covidctnet.core.files import atomic_write_text, write_csv
from covidctnet.core.labels import CLASS_NAMES
from covidctnet.core.model_dir import cached_by_model_dir
from covidctnet.core.slice_table import SLICES_SUFFIX
from covidctnet.evaluation.html_report import write_predict_html
from covidctnet.evaluation.plots import plot_residual_overlay
from covidctnet.inference.backends import check_precision, open_model
from covidctnet.inference.dicom_export import SKIPPED_NOT_DICOM, check_dicom_export, export_study
from covidctnet.inference.lesion_maps import cached_lesion_model, lesion_evidence, lesion_probability
from covidctnet.inference.residuals import compute_residual, resample_stack
from covidctnet.inference.slice_scores import (
    SliceScoresConfig,
    residual_statistics,
    score_residual,
    write_slices_csv,
)
from covidctnet.preprocessing.lungmask3d import LungMask, mask_to_grid, ras_lung_mask
from covidctnet.io.batch import MANIFEST_NAME, BatchSummary, Study, discover_studies, read_manifest, run_batch
from covidctnet.io.checks import check_volume
from covidctnet.io.dicomweb import TransferConfig, check_store_target
from covidctnet.io.dicomweb import store as store_instances
from covidctnet.io.volume import read_volume, write_nifti
from covidctnet.models.cnn3d import predict_proba, residual_to_network_input
from covidctnet.models.registry import ASSETS, DEMO_MODEL, LESION_COMPONENT
from covidctnet.preprocessing.preprocess import preprocess_volume, recorded_preprocess, resize_affine

__all__ = [
    "DEMO_SCAN",
    "PredictConfig",
    "Pipeline",
    "REPORT_COLUMNS",
    "load_pipeline",
    "predict_volume",
    "predict_studies",
    "run_demo",
]

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
PREVIEWS_DIR = "previews"
"""``OUT/previews/<study_id>.png``: the small overlay report.html shows when residuals are not saved."""
PREVIEW_DPI = 50
"""Resolution of the overlay drawn for report.html when residuals are not saved (12 x 4.4 in: 600 x 220 pixels)."""
MANIFEST_COLUMNS = ("p_control", "p_covid", "p_cap", "predicted", "model", "weights_sha256", "precision")
"""Stage columns of ``OUT/manifest.csv`` after the common ones; ``weights_sha256`` and ``precision`` are what resume
compares with the current run."""
REPORT_COLUMNS = (
    "study_id",
    "p_control",
    "p_covid",
    "p_cap",
    "predicted",
    "status",
    "error",
    "model",
    "weights_sha256",
)


@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``covidctnet predict`` (defaults = ``configs/predict.yaml``).

    Attributes:
        batch_size: slices per denoiser forward pass (memory grows linearly with it).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        save_residuals: also write each study's residual NIfTI and an overlay PNG.
        backend: ``auto`` (PyTorch on CUDA; on the CPU OpenVINO fp32 when installed, else onnxruntime, else
            PyTorch: see :mod:`covidctnet.inference.backends`), ``torch`` (the model directory's safetensors),
            ``onnx`` (onnxruntime on the CPU) or ``openvino`` (OpenVINO on the CPU, ``pip install
            'covidctnet[openvino]'``); the last two run an ``export-onnx`` folder, or a PyTorch model directory's
            export built once into a cache (:func:`covidctnet.inference.onnx_export.cached_export`). The report
            records the backend used.
        precision: denoiser arithmetic: ``fp32`` (default); ``bf16`` with the torch and openvino backends (several
            times faster on CPUs with AMX / AVX512-BF16 and on recent GPUs; probabilities move by about 1e-3, see
            ``docs/benchmarks.md``); ``int8`` with onnx and openvino, on an ``export-onnx --int8-calibration``
            folder (:mod:`covidctnet.inference.int8`).
        min_lung_ml: chest-coverage check: a scan whose 3D lung mask holds less (ml) is refused ("no lungs found:
            not a chest CT?"), before the networks run.
        dicom_out: folder for the opt-in DICOM output (a Comprehensive 3D SR and a Segmentation per DICOM study, in
            the source study, with its patient module; see :mod:`covidctnet.inference.dicom_export`); None: none.
        slice_scores: also write ``<study_id>_slices.csv``, the table of ``covidctnet slice-scores`` (its default
            settings, :class:`~covidctnet.inference.slice_scores.SliceScoresConfig`), from this run's denoising pass
            instead of a second one.
    """
    batch_size: int = 8
    device: str = "auto"
    save_residuals: bool = False
    backend: str = "auto"
    precision: str = "fp32"
    min_lung_ml: float = 500.0
    dicom_out: str | None = None
    slice_scores: bool = False

    def __post_init__(self) -> None:
        if self.min_lung_ml < 0:
            raise ConfigError(f"'min_lung_ml' must be >= 0, not {self.min_lung_ml}")
        if self.batch_size < 1:
            raise ConfigError(f"'batch_size' must be at least 1, not {self.batch_size}")
        check_precision(self.backend, self.precision)


@dataclass
class Pipeline:
    """A loaded model directory, ready to predict."""

    name: str
    preprocess: Any  # PreprocessConfig
    denoiser: Any  # torch.nn.Module, eval mode
    classifier: Any  # torch.nn.Module, eval mode
    depth: int
    size_xy: int
    device: Any
    weights_sha256: str
    backend: str = "torch"  # the backend used (never auto)
    evidence: str = "residual"  # what the classifier reads: the denoiser's residual or the lesion model's map
    lesion: Any = None  # the LesionModel of a directory with a lesion component (torch), else None


def load_pipeline(model_dir: str | os.PathLike, device: str = "auto", backend: str = "auto",
                  precision: str = "fp32") -> Pipeline:
    """Load a model directory with ``denoiser`` and ``classifier`` components (hashes checked).

    ``weights_sha256`` in the report is the sha256 of the directory's ``SHA256SUMS``, which covers the config and
    every weights file, so one value identifies the whole model (an ONNX export carries its source's SHA256SUMS, so
    both backends report the same value).

    Args:
        backend: ``auto`` (:func:`covidctnet.inference.backends.resolve_backend`; ``Pipeline.backend`` is the one
            picked), ``torch``, or ``onnx``: both networks run in onnxruntime on the CPU (``device`` is then ignored)
            from ``model_dir`` if it is an ``export-onnx`` output, else from its cached export; or ``openvino``: the
            same ONNX files, run by OpenVINO on the CPU.
        precision: the denoiser's arithmetic with ``onnx`` and ``openvino`` (fixed at loading); the torch backend
            takes it per call (:func:`predict_volume`).

    Raises:
        ModelDirError: missing component, hash mismatch, wrong architecture, or inconsistent sizes.
    """
    model = open_model(model_dir, backend, device, precision)
    md, dev = model.md, model.device
    pre = recorded_preprocess(md)
    denoiser, classifier = model.denoiser(), model.classifier()
    depth, height, width = md.classifier_grid()
    if height != width or height != pre.size_xy or denoiser.size_xy != pre.size_xy:
        raise ModelDirError(
            f"{md.path}: classifier input {height}x{width}, denoiser input {denoiser.size_xy} and preprocessing size "
            f"{pre.size_xy} must agree"
        )
    evidence = md.config.get("evidence", "residual")  # directories written before evidence existed: residual
    if evidence not in ("residual", "lesion"):
        raise ModelDirError(f"{md.path}/config.yaml: evidence must be 'residual' or 'lesion', not {evidence!r}")
    lesion = None
    if LESION_COMPONENT in (md.config.get("components") or {}):  # the classifier's evidence, or the slice table's
        # the small lesion U-Net runs in PyTorch whatever the denoiser's backend
        lesion = cached_lesion_model(str(md.path), "cpu" if model.backend != "torch" else str(dev))
        if lesion.size_xy != pre.size_xy:
            raise ModelDirError(f"{md.path}: lesion model input {lesion.size_xy} and preprocessing size "
                                f"{pre.size_xy} must agree")
    if evidence == "lesion" and lesion is None:
        raise ModelDirError(f"{md.path}/config.yaml: evidence lesion, but no lesion component")
    return Pipeline(model.name, pre, denoiser, classifier, depth, pre.size_xy, dev, md.sums_sha256,
                    backend=model.backend, evidence=evidence, lesion=lesion)


def predict_volume(pipeline: Pipeline, volume: Any, batch_size: int = 8, precision: str = "fp32",
                   with_residual: bool = False) -> dict[str, Any]:
    """Predict one checked HU volume (``precision``: the torch denoiser's, see :class:`PredictConfig`; an
    ``onnx`` or ``openvino`` pipeline has its precision fixed at loading, see :func:`load_pipeline`).

    Returns:
        ``probabilities`` (3,) in ``CLASS_NAMES`` order, ``predicted``, ``preprocessed`` ((X, Y, Z) array, affine),
        ``residual`` ((size, size, depth) array, affine: the classifier's input volume, i.e. the evidence the
        model directory records: the denoiser's residual, or the lesion model's map), ``residual_full`` (the
        denoiser's residual on the preprocessed grid, before resampling: (X, Y, Z) array, the preprocessed affine;
        slice scores are taken from it; None when the evidence is ``lesion`` and ``with_residual`` is false),
        ``lesion_full`` (the lesion map on that grid, or None) and ``seconds`` per step.
    """
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    array, affine = preprocess_volume(volume, pipeline.preprocess)
    seconds["preprocess"] = time.perf_counter() - t
    full = lesion_full = None
    if pipeline.evidence == "residual" or with_residual:
        t = time.perf_counter()
        # on the preprocessed grid first (what compute_residual resamples from), kept for predict --slice-scores
        full = compute_residual(
            array,
            pipeline.denoiser,
            depth=array.shape[2],
            size=array.shape[0],
            batch_size=batch_size,
            source=str(volume.source),
            precision=precision if pipeline.backend == "torch" else "fp32",
        )
        seconds["denoise"] = time.perf_counter() - t
    if pipeline.evidence == "lesion":
        t = time.perf_counter()
        lesion_full = lesion_evidence(array, affine, pipeline.lesion, batch_size)
        seconds["lesion"] = time.perf_counter() - t
    evidence_full = lesion_full if pipeline.evidence == "lesion" else full
    residual = resample_stack(evidence_full, (pipeline.size_xy, pipeline.size_xy, pipeline.depth))
    t = time.perf_counter()
    probs = predict_proba(pipeline.classifier, residual_to_network_input(residual)[None])[0].numpy().astype(np.float64)
    seconds["classify"] = time.perf_counter() - t
    return {
        "probabilities": probs,
        "predicted": CLASS_NAMES[int(np.argmax(probs))],
        "preprocessed": (array, affine),
        "residual": (residual, resize_affine(affine, array.shape, residual.shape)),
        "residual_full": (full, affine),
        "lesion_full": (lesion_full, affine),
        "seconds": seconds,
    }


# one load per process (each worker of --workers / --scheduler loads its own), again when the directory is rewritten
_cached_pipeline = cached_by_model_dir(maxsize=2)(load_pipeline)


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A report row for JSON: probabilities as numbers (empty for failed studies)."""
    return {**row, **{f"p_{c}": float(row[f"p_{c}"]) for c in CLASS_NAMES if row.get(f"p_{c}") not in ("", None)}}


def _predict_study(study: Study, out_dir: Path, model_dir: str, cfg: PredictConfig,
                   transfer: TransferConfig | None = None) -> dict[str, Any]:
    pipeline = _cached_pipeline(model_dir, cfg.device, cfg.backend, cfg.precision)
    t = time.perf_counter()
    volume = read_volume(study.path)
    passed = check_volume(volume, pipeline.preprocess.limits)
    read_s = time.perf_counter() - t

    # NoLungsError: not a chest CT, nothing is written
    hu, lungs_affine, lungs = ras_lung_mask(volume, cfg.min_lung_ml)
    passed = [*passed, "chest_coverage"]
    result = predict_volume(pipeline, volume, cfg.batch_size, cfg.precision, with_residual=cfg.slice_scores)
    probs = result["probabilities"]
    row: dict[str, Any] = {
        **{f"p_{c}": f"{p:.6f}" for c, p in zip(CLASS_NAMES, probs)},
        "predicted": result["predicted"],
        "model": pipeline.name,
        "weights_sha256": pipeline.weights_sha256,
        "precision": cfg.precision,
        "evidence": pipeline.evidence,
        "checks": " ".join(passed),
        "seconds": {"read": round(read_s, 3), **{k: round(v, 3) for k, v in result["seconds"].items()}},
    }
    if cfg.dicom_out:
        reported = {c: float(row[f"p_{c}"]) for c in CLASS_NAMES}  # the SR holds the report's numbers exactly
        row["dicom"] = export_study(cfg.dicom_out, study.study_id, volume, reported, result["predicted"], pipeline.name,
                                    pipeline.weights_sha256, *result["residual"], lungs.mask, lungs_affine,
                                    pipeline.evidence)
        if transfer is not None and transfer.store_to and row["dicom"] != SKIPPED_NOT_DICOM:
            row["stored"] = _store_dicom([Path(cfg.dicom_out) / name for name in row["dicom"].split()], transfer)
    # written after the DICOM output and its storing, which may fail, and before the study's JSON, whose presence
    # marks the study done
    row |= _write_evidence(study.study_id, out_dir, result, pipeline, lungs.mask > 0, cfg.save_residuals)
    if cfg.slice_scores:  # slice-scores' table from the residual of this pass: the slices are denoised once
        row["slices"] = f"{study.study_id}{SLICES_SUFFIX}"
        write_slices_csv(_slice_table(study.study_id, result, pipeline, hu, lungs_affine, lungs, cfg.batch_size),
                         out_dir / row["slices"])
    row["output"] = f"{PREDICTIONS_DIR}/{study.study_id}.json"
    (out_dir / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / row["output"], json.dumps(_json_row({"study_id": study.study_id, **row}), indent=2))
    logger.info(
        "%s: %s (%s)",
        study.study_id,
        result["predicted"],
        ", ".join(f"{c} {p:.3f}" for c, p in zip(CLASS_NAMES, probs)),
    )
    return row


def _store_dicom(written: list[Path], transfer: TransferConfig) -> dict[str, Any]:
    """Store one study's SR and SEG (SEG first: the SR references it); if that fails, the study failed: its files go
    (the error says what was stored)."""
    try:
        return store_instances(written, transfer)
    except CovidCTNetError:
        for path in written:
            path.unlink(missing_ok=True)
        if written[0].parent.is_dir() and not any(written[0].parent.iterdir()):
            written[0].parent.rmdir()
        raise


def _overlay_slice(evidence: np.ndarray, lung: np.ndarray) -> int | None:
    """The axial slice the overlay shows: the highest residual score (slice-scores' default statistic inside the
    lungs) among slices with at least a quarter of the largest lung cross-section (apex and base slices hold a few
    partial-volume voxels), not the middle one; None without lungs on this grid."""
    area = lung.sum(axis=(0, 1))
    if not area.max():
        return None
    score = np.full(evidence.shape[2], -np.inf)
    for k in np.flatnonzero(area >= 0.25 * area.max()):
        score[k] = residual_statistics(evidence[:, :, k][lung[:, :, k]])[SliceScoresConfig.statistic]
    return int(np.argmax(score))


def _write_evidence(study_id: str, out_dir: Path, result: dict[str, Any], pipeline: Pipeline, lung_mask: np.ndarray,
                    save_residuals: bool) -> dict[str, str]:
    """The study's overlay PNG (report.html shows it: full size with ``save_residuals``, with the evidence NIfTI,
    else a small preview) on the classifier's grid; returns the report fields naming the files."""
    residual, res_affine = result["residual"]
    if save_residuals:
        fields = {"residual": f"{study_id}_residual.nii.gz", "overlay": f"{study_id}_overlay.png"}
        write_nifti(residual, res_affine, out_dir / fields["residual"])
    else:  # for report.html only: 600x220 pixels
        fields = {"preview": f"{PREVIEWS_DIR}/{study_id}.png"}
        (out_dir / PREVIEWS_DIR).mkdir(parents=True, exist_ok=True)
    # resample_stack maps voxel edges onto edges, as the residual's grid (ndimage.zoom left the last slice black)
    ct_small = resample_stack(result["preprocessed"][0], residual.shape)
    lung = mask_to_grid(lung_mask, residual.shape)
    probs = result["probabilities"]
    title = f"{study_id}: {result['predicted']} " + " ".join(
        f"{c}={p:.2f}" for c, p in zip(CLASS_NAMES, probs)
    ) + ("; lesion probability" if pipeline.evidence == "lesion" else "")
    plot_residual_overlay(out_dir / (fields.get("overlay") or fields["preview"]), ct_small, residual, title=title,
                          lung_mask=lung, axial_index=_overlay_slice(residual, lung),
                          probability=pipeline.evidence == "lesion",
                          **({} if save_residuals else {"dpi": PREVIEW_DPI}))
    return fields


def _slice_table(study_id: str, result: dict[str, Any], pipeline: Pipeline, hu: np.ndarray,
                 lungs_affine: np.ndarray, lungs: LungMask, batch_size: int) -> list[dict[str, Any]]:
    """``slice-scores``' table of one study from this pass's residual (and the lesion model's map on the scan's own
    lung mask, as slice-scores computes it)."""
    full, full_affine = result["residual_full"]
    lesion = None
    if pipeline.lesion is not None:
        array = result["preprocessed"][0]
        lesion = (lesion_probability(array, mask_to_grid(lungs.mask > 0, array.shape), pipeline.lesion, batch_size),
                  full_affine)
    return score_residual(hu, lungs_affine, lungs, full, full_affine, SliceScoresConfig(), study_id, lesion)


def predict_studies(
    inputs: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PredictConfig = PredictConfig(),
    on_result: Callable[[dict[str, Any]], None] | None = None,
    *,
    resume: bool = True,
    workers: int = 0,
    scheduler: str | None = None,
    transfer: TransferConfig | None = None,
) -> BatchSummary:
    """``covidctnet predict``: predict every study found in ``inputs`` and write the report.

    A bad study gets ``status=error`` with its one-line message and the others are still predicted. Each study's
    result is kept as it finishes (``manifest.csv``, ``predictions/<study_id>.json``); ``report.csv``,
    ``report.json`` and ``report.html`` are written atomically once every study has been seen. Nothing is written if
    every study failed.

    Args:
        resume: skip studies whose prediction in ``out_dir`` is intact and was made by the same model and precision
            (another model or precision in the same folder is refused).
        workers: 0 predicts in this process; N > 0 in N spawned processes, each loading the model once and using
            ``cpu_count // N`` threads.
        scheduler: Dask scheduler address; the studies then run on its workers, which must see ``model_dir``, the
            inputs and ``out_dir`` (overrides ``workers``).
        transfer: with ``store_to``, each study's SR and SEG (``cfg.dicom_out``) are stored there
            (:func:`covidctnet.io.dicomweb.store`); the report gets a ``stored`` field (report.csv: column) with the
            target and the SOP Instance UIDs stored. DICOMweb inputs carry their own settings
            (:class:`~covidctnet.io.dicomweb.RemoteInput`).

    Raises:
        ConfigError: with ``resume``, ``out_dir``'s manifest holds predictions of another model or precision.
    """
    model_dir = str(Path(model_dir).resolve())
    storing = transfer is not None and transfer.store_to is not None
    if storing:
        if not cfg.dicom_out:
            raise ConfigError("--store-to sends the SR and SEG that --dicom-out writes: give --dicom-out DIR too")
        check_store_target(transfer.store_to)  # type: ignore[union-attr]
    if cfg.dicom_out:
        check_dicom_export()
    # loaded here even with workers: a bad model directory fails once, before any study, with its one-line error
    pipeline = _cached_pipeline(model_dir, cfg.device, cfg.backend, cfg.precision)
    studies = discover_studies(inputs)
    out_dir = Path(out_dir)
    if resume:
        _check_resumable(out_dir, pipeline, cfg)
    fn = functools.partial(_predict_study, model_dir=model_dir, cfg=cfg, transfer=transfer if storing else None)
    summary = run_batch(studies, out_dir, fn, MANIFEST_COLUMNS, resume=resume, workers=workers, scheduler=scheduler,
                        desc="predict", on_result=on_result)
    if summary.n_ok + summary.n_skipped:
        _write_reports(out_dir, summary, pipeline, cfg, storing)
    return summary


def _check_resumable(out_dir: Path, pipeline: Pipeline, cfg: PredictConfig) -> None:
    """Refuse to resume into a folder of another model or precision (the manifest is rewritten after every study, so
    this also covers a run that was killed half-way; the backend may change: onnxruntime and PyTorch agree to 1e-4)."""
    current = {"weights_sha256": pipeline.weights_sha256, "precision": cfg.precision}
    done = [r for r in read_manifest(out_dir / MANIFEST_NAME) if r.get("status") == "ok"]
    changed = sorted({k for r in done for k, v in current.items() if r.get(k) != v})
    if changed:
        raise ConfigError(f"{out_dir / MANIFEST_NAME}: {out_dir} holds predictions made with another "
                          f"{' / '.join(changed)}; use a new output folder or --no-resume")


def _write_reports(out_dir: Path, summary: BatchSummary, pipeline: Pipeline, cfg: PredictConfig,
                   storing: bool) -> None:
    """``report.csv``, ``report.json`` and ``report.html`` of every study seen, this run's and earlier runs'."""
    rows = []
    for r in summary.rows:
        if r.get("status") == "ok":  # the study's JSON holds the full row, also for studies done by an earlier run
            r = {**json.loads((out_dir / r["output"]).read_text()), "status": "ok", "error": "",
                 "source": r.get("source", ""), "label": r.get("label", "")}
        else:
            r = {**r, "model": pipeline.name, "weights_sha256": pipeline.weights_sha256}
        rows.append(r)

    if storing:  # one more column, only where something is stored: "<target> <SOP Instance UID> ..."
        write_csv(out_dir / "report.csv", (*REPORT_COLUMNS, "stored"), [
            {**r, "stored": " ".join([r["stored"]["to"], *r["stored"]["sop_instance_uids"]]) if r.get("stored") else ""}
            for r in rows])
    else:
        write_csv(out_dir / "report.csv", REPORT_COLUMNS, rows)
    report = {
        "model": pipeline.name,
        "weights_sha256": pipeline.weights_sha256,
        "class_names": list(CLASS_NAMES),
        "preprocess_profile": pipeline.preprocess.profile,
        "backend": pipeline.backend,  # the one auto picked
        "precision": cfg.precision,
        "studies": [_json_row({c: r.get(c, "") for c in REPORT_COLUMNS} | {k: r[k] for k in (
            "checks", "seconds", "residual", "overlay", "preview", "dicom", "stored", "label", "source") if k in r})
            for r in rows],
    }
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_predict_html(out_dir / "report.html", report, out_dir)


DEMO_SCAN = ASSETS / "demo" / "chest_ct_sample.nii.gz"


def run_demo(out_dir: str | os.PathLike, on_result: Callable[[dict[str, Any]], None] | None = None) -> BatchSummary:
    """``covidctnet demo``: predict the bundled real chest CT with the bundled demonstration model.

    Writes the report, the residual NIfTI and the overlay PNG to ``out_dir``. See the model card in
    ``covidctnet/assets/demo_model/MODEL_CARD.md`` for what the demonstration weights are and are not.
    """
    return predict_studies([DEMO_SCAN], DEMO_MODEL, out_dir, PredictConfig(save_residuals=True), on_result=on_result)
