"""``covidctnet predict`` and ``covidctnet demo``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli._common import batch_exit, bundled_model_notice, echo_error_row
from covidctnet.cli.options import (backend_option, batch_options, config_file_option, config_option, device_option,
                                    out_option, transfer_inputs, transfer_options)

_CONFIG = "covidctnet.inference.predict:PredictConfig"


def _print_report(summary, out_dir: Path) -> None:
    for row in summary.rows:
        if row.get("status") == "ok":
            probs = "  ".join(f"{c}={row[f'p_{c}']}" for c in ("control", "covid", "cap"))
            click.echo(f"{row['study_id']}: {row['predicted']}  ({probs})")
            if row.get("overlay"):
                click.echo(f"  overlay:  {out_dir / row['overlay']}")
                click.echo(f"  residual: {out_dir / row['residual']}")
            if row.get("slices"):
                click.echo(f"  slices:   {out_dir / row['slices']}")
    if summary.n_ok + summary.n_skipped:
        click.echo(f"report: {out_dir / 'report.csv'}  {out_dir / 'report.json'}  {out_dir / 'report.html'}")


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Model directory with denoiser and classifier components (config.yaml, *.safetensors, SHA256SUMS)  "
    "[default: the bundled demonstration model].",
)
@out_option("Output folder: report.csv, report.json, report.html (and residuals/overlays with --save-residuals).")
@config_file_option("predict.yaml")
@config_option(_CONFIG, "--batch-size", type=int, help="Slices per denoiser forward pass.")
@device_option(_CONFIG)
@config_option(
    _CONFIG,
    "--save-residuals",
    is_flag=True,
    help="Write <id>_residual.nii.gz and an overlay PNG (axial, coronal, sagittal) per study.",
)
@config_option(
    _CONFIG,
    "--slice-scores",
    is_flag=True,
    help="Also write <id>_slices.csv, the table of `covidctnet slice-scores` (its default settings), from the same "
    "denoising pass: the slices are denoised once.",
)
@backend_option(_CONFIG, extra=" report.json records the backend used.")
@config_option(
    _CONFIG,
    "--precision",
    type=click.Choice(["fp32", "bf16", "int8"]),
    help="Denoiser arithmetic: fp32; bf16 (torch and openvino backends), several times faster on CPUs with AMX or "
    "AVX512-BF16; int8 (onnx and openvino), on an `export-onnx --int8-calibration` folder.",
)
@config_option(
    _CONFIG,
    "--dicom-out",
    type=click.Path(file_okay=False),
    help="Also write, per DICOM study, a DICOM SR (probabilities, call, model) and a Segmentation of the high residual "
    "in the lungs into this folder, in the source study with its patient data, for the PACS it came from "
    "(pip install 'covidctnet[dicom]').",
)
@transfer_options(store=True)
@batch_options("Worker processes, each with its own copy of the model; 0 predicts in this process.",
               "Skip studies already predicted into OUT by the same model (OUT/manifest.csv).")
def predict_cmd(inputs, model_dir, out_dir, config_path, batch_size, device, save_residuals, slice_scores, backend,
                precision, dicom_out, workers, resume, scheduler, **transfer):
    """Diagnose CT studies (DICOM folders, NIfTI/NRRD files, dataset roots, DICOMweb study URLs):
    control / COVID-19 / CAP.

    Runs preprocess -> BCDU-Net denoising -> residual -> 3D CNN and writes OUT/report.csv, report.json and
    report.html (one page: a row per study with the call, probability bars, overlay, checks and timings).
    A bad study is reported and the others are still predicted (exit code 1); 2 if every study failed.

    A study on a PACS: dicomweb+http(s)://HOST:PORT/dicom-web/studies/<StudyInstanceUID>[/series/<SeriesUID>], or
    the server's base URL with --query; credentials from COVIDCTNET_DICOMWEB_TOKEN, COVIDCTNET_DICOMWEB_USER and
    COVIDCTNET_DICOMWEB_PASSWORD, or ~/.netrc. --store-to sends the --dicom-out SR and SEG back.
    """
    from covidctnet.core.config import load_config
    from covidctnet.inference.predict import PredictConfig, predict_studies
    from covidctnet.models.registry import DEMO_MODEL

    bundled = model_dir is None
    model_dir = DEMO_MODEL if bundled else model_dir

    cfg = load_config(
        PredictConfig,
        config_path,
        {"batch_size": batch_size, "device": device, "save_residuals": save_residuals, "backend": backend,
         "precision": precision, "dicom_out": dicom_out, "slice_scores": slice_scores},
    )
    inputs, transfer_cfg = transfer_inputs(inputs, **transfer)
    summary = predict_studies(inputs, model_dir, out_dir, cfg, on_result=echo_error_row, resume=resume,
                              workers=workers, scheduler=scheduler, transfer=transfer_cfg)
    _print_report(summary, out_dir)
    if bundled and summary.n_ok + summary.n_skipped:  # after the run: a bad input stays one line
        bundled_model_notice("3D model (covidctnet/assets/demo_model)")
    sys.exit(batch_exit(summary))


@click.command("demo")
@out_option("Output folder.", default="covidctnet-demo", show_default=True)
def demo_cmd(out_dir):
    """Predict the bundled real chest CT with the bundled demonstration model and print the report.

    The demonstration weights were trained by this project on a handful of scans: they show the pipeline working end
    to end and are not a diagnostic model (see covidctnet/assets/demo_model/MODEL_CARD.md).
    """
    from covidctnet.inference.predict import DEMO_SCAN, run_demo
    from covidctnet.models.registry import DEMO_MODEL

    bundled_model_notice("3D model (covidctnet/assets/demo_model)")
    click.echo(f"scan:  {DEMO_SCAN}\nmodel: {DEMO_MODEL}")
    summary = run_demo(out_dir, on_result=echo_error_row)
    _print_report(summary, out_dir)
    sys.exit(batch_exit(summary))
