"""``covidctnet slice-scores``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli._common import batch_exit, bundled_model_notice, echo_error_row
from covidctnet.cli.options import (backend_option, batch_options, config_file_option, config_option, device_option,
                                    out_option, transfer_inputs, transfer_options)

_CONFIG = "covidctnet.inference.slice_scores:SliceScoresConfig"


@click.command("slice-scores")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option("Output folder: <study_id>_slices.csv per scan and manifest.csv.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory with a denoiser component  [default: the bundled demonstration model].")
@click.option("--denoiser", "denoiser_dir", type=click.Path(path_type=Path), default=None,
              help="Denoiser model directory or train-denoiser run folder (instead of --model).")
@click.option("--lesion-model", "lesion_dir", type=click.Path(path_type=Path), default=None,
              help="Lesion model directory or train-lesion-model run folder  [default: the --model directory's "
                   "lesion component, when it has one].")
@config_file_option("slice_scores.yaml")
@config_option(_CONFIG, "--evidence", type=click.Choice(["auto", "residual", "lesion", "hu"]),
               help="Which score is written as evidence_score: the lesion model's lesion probability, the denoiser's "
                    "residual, or the HU density baseline; auto: lesion when a lesion model is there (the bundled "
                    "model has one), else residual.")
@config_option(_CONFIG, "--statistic", type=click.Choice(["mean_pos", "mean_abs", "p95", "frac_pos"]),
               help="Residual statistic inside the lungs written as residual_score.")
@config_option(_CONFIG, "--min-lung-ml", "min_lung_ml", type=float,
               help="Chest-coverage check: a scan with less lung (ml) is refused.")
@device_option(_CONFIG)
@backend_option(_CONFIG)
@transfer_options()
@batch_options("Worker processes; 0 runs in this process (best for debugging).",
               "Skip studies already 'ok' in OUT/manifest.csv whose output is unchanged.")
def slice_scores_cmd(inputs, out_dir, model_dir, denoiser_dir, lesion_dir, config_path, evidence, statistic,
                     min_lung_ml, device, backend, workers, scheduler, resume, **transfer):
    """Per original slice of each CT: lung volume and the evidence of infection inside the lungs.

    Writes OUT/<study_id>_slices.csv (study_id, slice, z_mm, lung_ml, evidence, evidence_score, residual_score,
    hu_score, lesion_score where a lesion model ran, and every candidate residual statistic); evidence_score is the
    score --evidence names. A scan with too little lung is refused ("no lungs found: not a chest CT?"). One bad study
    is recorded in manifest.csv and the others go on; the exit code is 1 if some failed, 2 if all did. INPUTS may
    be DICOMweb study or series URLs (dicomweb+http(s)://HOST:PORT/dicom-web/studies/<StudyInstanceUID>).
    """
    from covidctnet.core.config import load_config
    from covidctnet.core.errors import ConfigError
    from covidctnet.inference.slice_scores import SliceScoresConfig, slice_scores
    from covidctnet.models.registry import DEMO_MODEL

    if model_dir is not None and denoiser_dir is not None:
        raise ConfigError("give one of --model DIR or --denoiser DIR, not both")
    cfg = load_config(SliceScoresConfig, config_path,
                      {"evidence": evidence, "statistic": statistic, "min_lung_ml": min_lung_ml, "device": device,
                       "backend": backend})
    source = model_dir or denoiser_dir or DEMO_MODEL
    inputs, _ = transfer_inputs(inputs, **transfer)
    summary = slice_scores(inputs, out_dir, source, cfg, lesion_model=lesion_dir, resume=resume, workers=workers,
                           scheduler=scheduler,
                           on_result=echo_error_row)
    click.echo(f"slice-scores: {summary.n_ok} done, {summary.n_skipped} already done, {summary.n_failed} failed"
               + (f"; manifest: {summary.manifest}" if summary.manifest and summary.manifest.exists() else ""),
               err=True)
    if source == DEMO_MODEL and summary.n_ok + summary.n_skipped:  # after the run: a bad input stays one line
        bundled_model_notice("3D model's denoiser (covidctnet/assets/demo_model)")
    sys.exit(batch_exit(summary))
