"""``covidctnet validate-residuals``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli.options import config_file_option, config_option, out_option

_CONFIG = "covidctnet.evaluation.residual_validation:ValidateResidualsConfig"


@click.command("validate-residuals")
@click.argument("slices_dir", type=click.Path(path_type=Path))
@click.option("--labels", "labels_path", required=True, type=click.Path(path_type=Path),
              help="Slice labels: a CSV (study_id, z_mm, infected[, LLL, LUL, RLL, RML, RUL]; e.g. "
                   "ct-dicom-full/slice_labels.csv) or COVID-CT-MD's Slice-level-labels-updated-1.npy as published.")
@click.option("--label-index", type=click.Path(path_type=Path), default=None,
              help="COVID-CT-MD's Index.csv (Label Index, Folder/ID); default: the one beside the --labels .npy.")
@click.option("--lobe-labels", type=click.Path(path_type=Path), default=None,
              help="COVID-CT-MD's Lobe-level-labels-updated-1.npy: adds a per-lobe analysis.")
@out_option("Output folder: metrics.json, report.md, matched_labels.csv, <study_id>_scores.png.")
@config_file_option("validate_residuals.yaml")
@config_option(_CONFIG, "--lung-fraction", type=float,
               help="Lung slices: lung_ml >= this fraction of the scan's largest.")
def validate_residuals_cmd(slices_dir, labels_path, label_index, lobe_labels, out_dir, config_path, lung_fraction):
    """Slice-level AUCs (DeLong CIs and paired tests) of residual_score, hu_score and lung_ml in SLICES_DIR
    (a `covidctnet slice-scores` output) against slice labels: within each patient, and pooled against the lung
    slices of normal subjects (studies without any infected slice). COVID-CT-MD's label files are read as published:
    a study is the case whose Folder/ID ends its id (covid-P001 is P001)."""
    from covidctnet.core.config import load_config
    from covidctnet.evaluation.residual_validation import SCORES, ValidateResidualsConfig, validate_residuals

    cfg = load_config(ValidateResidualsConfig, config_path, {"lung_fraction": lung_fraction})
    metrics = validate_residuals(slices_dir, labels_path, out_dir, cfg, label_index=label_index,
                                 lobe_labels=lobe_labels)
    for sid, block in list(metrics["per_study"].items()) + [("pooled", metrics.get("pooled") or {})]:
        if "auc" in block:
            aucs = "  ".join(f"{s}={block['auc'][s]['value']:.3f}" for s in SCORES)
            click.echo(f"{sid}: {block['n_slices']} lung slices ({block['n_infected']} infected)  {aucs}")
    click.echo(f"report: {out_dir / 'report.md'}  {out_dir / 'metrics.json'}  {out_dir / 'matched_labels.csv'}")
