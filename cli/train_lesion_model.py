"""``covidctnet train-lesion-model``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli.options import config_option, resumable_run_options, resumed_config_path

_CONFIG = "covidctnet.training.lesion:LesionModelConfig"


@click.command("train-lesion-model")
@click.argument("controls", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@resumable_run_options(_CONFIG, "lesion_model.yaml",
                       "Run folder: checkpoints/, metrics.csv, samples/, and model/ at the end.")
@config_option(_CONFIG, "--lesion-masks", "lesion_masks", type=click.Path(exists=True, file_okay=False),
               help="Folder of MosMed-style *_mask.nii.gz lesion masks whose shapes are inserted (overrides the "
                    "config).")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from checkpoints/last.pt.")
def train_lesion_model_cmd(controls, run_dir, config_path, device, epochs, lesion_masks, num_workers, max_steps,
                           checkpoint_every, resume):
    """Train the label-free lesion model on CONTROLS (control CT scans: DICOM folders, NIfTI files or folders).

    Lesions are synthesised inside the controls' lungs (real lesion shapes from --lesion-masks and random blobs,
    ground glass and consolidation) and a 2D U-Net learns to segment them; no labelled scan is used. The model
    directory it writes is what `slice-scores --lesion-model` and `--evidence lesion` use.
    """
    from covidctnet.core.config import load_config
    from covidctnet.training.lesion import LesionModelConfig, train_lesion_model

    overrides = {"epochs": epochs, "device": device, "num_workers": num_workers, "max_steps": max_steps,
                 "checkpoint_every": checkpoint_every, "lesion_masks": str(lesion_masks) if lesion_masks else None}
    cfg = load_config(LesionModelConfig, resumed_config_path(config_path, run_dir, resume), overrides)
    result = train_lesion_model(controls, run_dir, cfg, resume=resume,
                                command=" ".join(["covidctnet", *sys.argv[1:]]) if sys.argv else None)
    if result.model_dir is not None:
        click.echo(f"train-lesion-model: best epoch {result.best_epoch} of {result.epochs_run}; held-out Dice on "
                   f"synthetic lesions {result.val.get('val_dice', float('nan')):.3f}; model directory: "
                   f"{result.model_dir}", err=True)
