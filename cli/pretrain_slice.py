"""``covidctnet pretrain-slice``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

_ARCHS = ["densenet121", "densenet169", "resnet18", "resnet50"]


@click.command("pretrain-slice")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints/, metrics.csv, loss_curve.png, encoder/ (for train-slice --init).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML overriding configs/pretrain_slice.yaml.")
@click.option("--arch", type=click.Choice(_ARCHS), default=None, help="MONAI 2D network  [default: resnet18].")
@click.option("--size", type=int, default=None, help="Square input size in pixels  [default: 160].")
@click.option("--epochs", type=int, default=None, help="Pretraining epochs  [default: 20].")
@click.option("--batch-size", type=int, default=None, help="Images per step (2 views each)  [default: 32].")
@click.option("--lung-mask/--no-lung-mask", default=None, help="Add the classical lung mask as a 2nd channel.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N  [default: auto].")
@click.option("--seed", type=int, default=None, help="Seed  [default: 0].")
@click.option("--workers", type=int, default=None, help="DataLoader workers  [default: 0].")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
def pretrain_slice_cmd(data, run_dir, config_path, arch, size, epochs, batch_size, lung_mask, device, seed, workers,
                       resume):
    """Contrastive (SimCLR) pretraining of the slice encoder on DATA's training images, without labels.

    The encoder in OUT/encoder starts `covidctnet train-slice --init OUT/encoder` (same arch, size, lung mask).
    """
    from covidctnet.config import load_config
    from covidctnet.slice_training import PretrainSliceConfig, pretrain_slice

    overrides = {"arch": arch, "size": size, "epochs": epochs, "batch_size": batch_size, "lung_mask": lung_mask,
                 "device": device, "seed": seed, "workers": workers}
    cfg = load_config(PretrainSliceConfig, config_path, overrides)
    command = "covidctnet " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    summary = pretrain_slice(data, run_dir, cfg, resume=resume, command=command)
    if summary:
        click.echo(f"pretrain-slice: {summary['epochs_run']} epochs, final NT-Xent loss {summary['final_loss']:.4f}; "
                   f"encoder: {summary['encoder_dir']}", err=True)
