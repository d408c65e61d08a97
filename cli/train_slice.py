"""``covidctnet train-slice``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli._common import typed_command
from covidctnet.cli.options import config_file_option, config_option, loop_options, out_option, slice_arch_option

_CONFIG = "covidctnet.training.slice:SliceTrainConfig"


@click.command("train-slice")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@out_option("Run folder: checkpoints/, metrics.csv, loss_curve.png, roc.png, confusion.png, model/.", "run_dir")
@config_file_option("slice.yaml")
@slice_arch_option(_CONFIG)
@config_option(_CONFIG, "--width", type=float, help="ResNet channel multiplier (1 for ImageNet weights).")
@config_option(_CONFIG, "--image-size", "size", key="size", old_names=("--size",), type=int,
               help="Square input size of the slice images in pixels (paper: 480).")
@config_option(_CONFIG, "--epochs", type=int, help="Training epochs (cosine period).")
@config_option(_CONFIG, "--batch-size", type=int, help="Images per step and process.")
@config_option(_CONFIG, "--lung-mask/--no-lung-mask", help="Add a classical lung mask as a 2nd input channel.")
@click.option("--init", "init", default=None, metavar="imagenet|FILE|MODEL_DIR",
              help="Start from torchvision's ImageNet weights (its cache, $TORCH_HOME/hub/checkpoints, downloaded "
                   "there if missing), a torchvision/timm state-dict file, or the encoder of a pretrain-slice (or "
                   "train-slice) model directory.")
@loop_options(_CONFIG, "Seed of weights, data order and augmentation.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
def train_slice_cmd(data, run_dir, config_path, arch, width, size, epochs, batch_size, lung_mask, init, device, seed,
                    workers, resume):
    """Train the COVID-19 vs non-COVID slice classifier on DATA (UCSD COVID-CT layout or <split>/<class>/ folders).

    Trains on the train split, selects the epoch on validation AUC, and writes the validation ROC and confusion
    matrix and a model directory (OUT/model) for predict-slice. Under `torchrun --nproc_per_node N` it runs
    DistributedDataParallel.
    """
    from covidctnet.core.config import load_config
    from covidctnet.training.slice import SliceTrainConfig, train_slice

    overrides = {"arch": arch, "width": width, "size": size, "epochs": epochs, "batch_size": batch_size,
                 "lung_mask": lung_mask, "init": init, "device": device, "seed": seed, "workers": workers}
    cfg = load_config(SliceTrainConfig, config_path, overrides)
    command = typed_command()
    summary = train_slice(data, run_dir, cfg, resume=resume, command=command)
    if summary.model_dir is not None:
        v = summary.val
        click.echo(f"train-slice: best epoch {summary.best_epoch}: validation accuracy {100 * v['accuracy']:.1f}%, "
                   f"F1 {100 * v['f1']:.1f}, AUC {100 * v['auc']:.1f} (n={int(v['n'])}); model: {summary.model_dir}",
                   err=True)
