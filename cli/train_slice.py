"""``covidctnet train-slice``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

_ARCHS = ["densenet121", "densenet169", "resnet18", "resnet50"]


@click.command("train-slice")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints/, metrics.csv, loss_curve.png, roc.png, confusion.png, model/.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML overriding configs/slice.yaml.")
@click.option("--arch", type=click.Choice(_ARCHS), default=None, help="MONAI 2D network  [default: resnet18].")
@click.option("--size", type=int, default=None, help="Square input size in pixels (paper: 480)  [default: 160].")
@click.option("--epochs", type=int, default=None, help="Training epochs (cosine period)  [default: 30].")
@click.option("--batch-size", type=int, default=None, help="Images per step and process  [default: 16].")
@click.option("--lung-mask/--no-lung-mask", default=None, help="Add a classical lung mask as a 2nd input channel.")
@click.option("--init", "init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Model directory from pretrain-slice (or train-slice) whose encoder starts the training.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N  [default: auto].")
@click.option("--seed", type=int, default=None, help="Seed of weights, data order and augmentation  [default: 0].")
@click.option("--workers", type=int, default=None, help="DataLoader workers (0 = this process)  [default: 0].")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
def train_slice_cmd(data, run_dir, config_path, arch, size, epochs, batch_size, lung_mask, init, device, seed,
                    workers, resume):
    """Train the COVID-19 vs non-COVID slice classifier on DATA (UCSD COVID-CT layout or <split>/<class>/ folders).

    Trains on the train split, selects the epoch on validation AUC, and writes the validation ROC and confusion
    matrix and a model directory (OUT/model) for predict-slice. Under `torchrun --nproc_per_node N` it runs
    DistributedDataParallel.
    """
    from covidctnet.config import load_config
    from covidctnet.slice_training import SliceTrainConfig, train_slice

    overrides = {"arch": arch, "size": size, "epochs": epochs, "batch_size": batch_size, "lung_mask": lung_mask,
                 "init": str(init) if init else None, "device": device, "seed": seed, "workers": workers}
    cfg = load_config(SliceTrainConfig, config_path, overrides)
    command = "covidctnet " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    summary = train_slice(data, run_dir, cfg, resume=resume, command=command)
    if summary:
        v = summary["val"]
        click.echo(f"train-slice: best epoch {summary['best_epoch']}: validation accuracy {100 * v['accuracy']:.1f}%, "
                   f"F1 {100 * v['f1']:.1f}, AUC {100 * v['auc']:.1f} (n={int(v['n'])}); model: {summary['model_dir']}",
                   err=True)
