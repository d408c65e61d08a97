"""``covidctnet preprocess``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli._common import batch_exit, echo_error_row
from covidctnet.cli.options import (batch_options, config_file_option, config_option, out_option, transfer_inputs,
                                    transfer_options)

_CONFIG = "covidctnet.preprocessing.preprocess:PreprocessConfig"


@click.command("preprocess")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option("Output folder: <study_id>.nii.gz, manifest.csv, preprocess.yaml.")
@config_file_option("preprocess.yaml")
@config_option(
    _CONFIG,
    "--profile",
    type=click.Choice(["default", "official"]),
    help="default: MONAI chain, 240x240, clip. official: the official CovidCTNet numerics "
    "(cubic zoom, out-of-window HU set to -1000, 128x128) for its published weights.",
)
@config_option(_CONFIG, "--size", "size_xy", type=int, help="In-plane output size in voxels.")
@click.option("--series-uid", default=None, help="SeriesInstanceUID to read when one DICOM folder holds several.")
@transfer_options()
@batch_options("Worker processes; 0 runs in this process (best for debugging).",
               "Skip studies already 'ok' in OUT/manifest.csv whose output is unchanged.")
def preprocess_cmd(inputs, out_dir, config_path, profile, size_xy, workers, scheduler, series_uid, resume,
                   **transfer):
    """Resample CT studies to 1 mm RAS, SIZE x SIZE in-plane, float32 in [0, 1].

    INPUTS are NIfTI/NRRD files, DICOM series folders, dataset roots (the MosMed studies/CT-k/ layout gives
    labels), or DICOMweb study URLs (dicomweb+http(s)://HOST:PORT/dicom-web/studies/<StudyInstanceUID>, or the
    server's URL with --query; see `covidctnet predict --help`). One bad study is recorded in manifest.csv and the others go on; the exit code is 1 if some failed,
    2 if all did.
    """
    # Heavy imports (torch, MONAI) happen here, not at `covidctnet --help`.
    from covidctnet.core.config import load_config
    from covidctnet.preprocessing.preprocess import OFFICIAL_PROFILE, PreprocessConfig, preprocess_studies

    cfg = load_config(
        PreprocessConfig,
        config_path,
        {"size_xy": size_xy, "profile": profile},
        defaults=OFFICIAL_PROFILE if profile == "official" else None,
    )
    inputs, _ = transfer_inputs(inputs, **transfer)
    summary = preprocess_studies(
        inputs,
        out_dir,
        cfg,
        resume=resume,
        workers=workers,
        series_uid=series_uid,
        on_result=echo_error_row,
        scheduler=scheduler,
    )
    click.echo(
        f"preprocess: {summary.n_ok} done, {summary.n_skipped} already done, {summary.n_failed} failed"
        + (f"; manifest: {summary.manifest}" if summary.manifest and summary.manifest.exists() else ""),
        err=True,
    )
    sys.exit(batch_exit(summary))
