"""``covidctnet train-classifier``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli._common import typed_command
from covidctnet.cli.options import (
    config_file_option,
    config_option,
    device_option,
    loader_workers_option,
    out_option,
    step_options,
)

_CONFIG = "covidctnet.training.classifier:ClassifierConfig"


@click.command("train-classifier")
@click.argument("residuals", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--labels", "labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV study_id,label[,patient_id] (control/covid/cap, aliases or 0/1/2). Default: the label "
                   "column of RESIDUALS/manifest.csv.")
@out_option("Run folder: split.csv, checkpoints/, metrics.csv, loss_curve.png, roc.png, confusion.png, model/.",
            "run_dir")
@config_file_option("classifier.yaml")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV study_id,split (train/val/test) instead of a seeded patient-level split.")
@config_option(_CONFIG, "--arch", help="covidctnet3d (official CNN) or a MONAI 3D net: densenet121, resnet18, ….")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="MedicalNet-style 3D ResNet weights (e.g. resnet_18_23dataset.pth) that start a resnet10/18/34/50.")
@config_option(_CONFIG, "--epochs", type=int, help="Maximum training epochs.")
@config_option(_CONFIG, "--batch-size", type=int, help="Volumes per step and process.")
@config_option(_CONFIG, "--seed", type=int, help="Seed of split, weights, data order, augmentation.")
@device_option(_CONFIG)
@loader_workers_option(_CONFIG)
@step_options(_CONFIG)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt (with OUT/split.csv).")
def train_classifier_cmd(residuals, labels, run_dir, config_path, split_file, arch, epochs, batch_size, seed, device,
                         workers, max_steps, checkpoint_every, init, resume):
    """Train the 3D CNN (control / COVID-19 / CAP) on the residual volumes in RESIDUALS.

    Splits the studies by patient, trains with a class-weighted cross-entropy and MONAI 3D augmentation, selects the
    epoch on validation macro AUC, and writes the validation ROC and confusion matrix and a model directory
    (OUT/model). Under `torchrun --nproc_per_node N` it runs DistributedDataParallel.
    """
    # heavy imports here, not at module level: `covidctnet --help` must not load torch
    from covidctnet.core.config import load_config
    from covidctnet.training.classifier import ClassifierConfig, train_classifier

    overrides = {"arch": arch, "epochs": epochs, "batch_size": batch_size, "seed": seed, "device": device,
                 "workers": workers, "max_steps": max_steps, "checkpoint_every": checkpoint_every}
    overrides["init"] = str(init) if init else None
    cfg = load_config(ClassifierConfig, config_path, overrides)
    command = typed_command()
    summary = train_classifier(residuals, run_dir, cfg, labels=labels, split_file=split_file, resume=resume,
                               command=command)
    if summary.model_dir is not None:
        v = summary.val
        auc = "n/a (one class)" if v["auc"] != v["auc"] else f"{v['auc']:.3f}"
        click.echo(f"train-classifier: best epoch {summary.best_epoch} by {summary.monitor}: validation macro "
                   f"AUC {auc}, accuracy {100 * v['accuracy']:.1f}% (n={v['n']}); model: {summary.model_dir}",
                   err=True)
