"""``covidctnet residuals``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli._common import batch_exit, echo_error_row
from covidctnet.cli.options import (backend_option, batch_options, config_file_option, config_option, device_option,
                                    out_option)

_CONFIG = "covidctnet.inference.residuals:ResidualGrid"


@click.command("residuals")
@click.argument("preprocessed", type=click.Path(path_type=Path))
@out_option("Output folder: <study_id>_residual.nii.gz, manifest.csv, residuals.yaml.")
@click.option("--denoiser", required=True, type=click.Path(path_type=Path),
              help="Denoiser model directory, or a train-denoiser run folder holding model/.")
@click.option("--lesion-model", type=click.Path(path_type=Path), default=None,
              help="Write this lesion model's maps (train-lesion-model) instead of residuals: the input of a "
                   "classifier that follows the lesion evidence. The denoiser is then only recorded.")
@config_file_option("residuals.yaml")
@config_option(_CONFIG, "--depth", type=int, help="Slices of the residual stack.")
@config_option(_CONFIG, "--grid-size", "size_xy", key="size_xy", old_names=("--size",), type=int,
               help="In-plane size of the residual stack (the classifier's input grid).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Slices per denoiser forward pass.")
@device_option()
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Denoiser arithmetic; bf16 is several times faster on CPUs with AMX (use the same for training "
                   "and predict).")
@backend_option()
@batch_options("Worker processes; 0 runs in this process (best for debugging).",
               "Skip studies already 'ok' in OUT/manifest.csv whose output is unchanged.")
def residuals_cmd(preprocessed, out_dir, denoiser, lesion_model, config_path, depth, size_xy, batch_size, device,
                  precision, backend, workers, scheduler, resume):
    """Residual maps (input - denoised, signed float32) of every study in PREPROCESSED, resampled to the
    classifier's grid (depth x size x size), overlaying on the preprocessed scans.

    One bad study is recorded in manifest.csv and the others go on; the exit code is 1 if some failed, 2 if all did.
    """
    # Heavy imports (torch, MONAI) happen here, not at `covidctnet --help`.
    from covidctnet.inference.residuals import compute_residuals, read_residual_grid

    grid = read_residual_grid(config_path, depth=depth, size_xy=size_xy)
    summary = compute_residuals(preprocessed, out_dir, denoiser, grid, batch_size=batch_size, device=device,
                                precision=precision, backend=backend, lesion_model=lesion_model, resume=resume,
                                workers=workers, scheduler=scheduler, on_result=echo_error_row)
    click.echo(f"residuals: {summary.n_ok} done, {summary.n_skipped} already done, {summary.n_failed} failed"
               + (f"; manifest: {summary.manifest}" if summary.manifest and summary.manifest.exists() else ""),
               err=True)
    sys.exit(batch_exit(summary))
