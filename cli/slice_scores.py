"""``covidctnet slice-scores``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli._common import batch_exit, echo_error_row


@click.command("slice-scores")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <study_id>_slices.csv per scan and manifest.csv.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory with a denoiser component (e.g. the bundled demo model).")
@click.option("--denoiser", "denoiser_dir", type=click.Path(path_type=Path), default=None,
              help="Denoiser model directory or train-denoiser run folder (instead of --model).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML overriding configs/slice_scores.yaml.")
@click.option("--statistic", type=click.Choice(["mean_pos", "mean_abs", "p95", "frac_pos"]), default=None,
              help="Residual statistic written as residual_score (default p95: 95th percentile inside the lungs).")
@click.option("--min-lung-ml", type=float, default=None, help="Chest-coverage minimum lung volume (default 500 ml).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N  [default: auto]")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Worker processes; 0 runs in this process (best for debugging).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip studies already 'ok' in OUT/manifest.csv whose output is unchanged.")
def slice_scores_cmd(inputs, out_dir, model_dir, denoiser_dir, config_path, statistic, min_lung_ml, device, workers,
                     resume):
    """Per original slice of each CT: lung volume, residual score inside the lungs and an HU density baseline.

    Writes OUT/<study_id>_slices.csv (study_id, slice, z_mm, lung_ml, residual_score, hu_score, and every candidate
    residual statistic). A scan with too little lung is refused ("no lungs found: not a chest CT?"). One bad study
    is recorded in manifest.csv and the others go on; the exit code is 1 if some failed, 2 if all did.
    """
    from covidctnet.config import load_config
    from covidctnet.errors import ConfigError
    from covidctnet.inference.slice_scores import SliceScoresConfig, slice_scores

    if (model_dir is None) == (denoiser_dir is None):
        raise ConfigError("give exactly one of --model DIR or --denoiser DIR")
    cfg = load_config(SliceScoresConfig, config_path,
                      {"statistic": statistic, "min_lung_ml": min_lung_ml, "device": device})
    summary = slice_scores(inputs, out_dir, model_dir or denoiser_dir, cfg, resume=resume, workers=workers,
                           on_result=echo_error_row)
    click.echo(f"slice-scores: {summary.n_ok} done, {summary.n_skipped} already done, {summary.n_failed} failed"
               + (f"; manifest: {summary.manifest}" if summary.manifest and summary.manifest.exists() else ""),
               err=True)
    sys.exit(batch_exit(summary))
