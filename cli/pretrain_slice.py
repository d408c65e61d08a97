"""``covidctnet pretrain-slice``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli._common import typed_command
from covidctnet.cli.options import config_file_option, config_option, loop_options, out_option, slice_arch_option

_CONFIG = "covidctnet.training.simclr:PretrainSliceConfig"


@click.command("pretrain-slice")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@out_option("Run folder: checkpoints/, metrics.csv, loss_curve.png, encoder/ (for train-slice --init).", "run_dir")
@config_file_option("pretrain_slice.yaml")
@slice_arch_option(_CONFIG)
@config_option(_CONFIG, "--image-size", "size", key="size", old_names=("--size",), type=int,
               help="Square input size of the slice images in pixels.")
@config_option(_CONFIG, "--epochs", type=int, help="Pretraining epochs.")
@config_option(_CONFIG, "--batch-size", type=int, help="Images per step (2 views each).")
@config_option(_CONFIG, "--lung-mask/--no-lung-mask", help="Add the classical lung mask as a 2nd channel.")
@config_option(_CONFIG, "--extra-ct", type=click.Path(exists=True, file_okay=False),
               help="Folder of CT volumes (NIfTI/NRRD/MHA, DICOM series folders) whose lung slices, rendered as "
                    "paper figures, are added to the unlabelled images.")
@config_option(_CONFIG, "--data-images/--no-data-images",
               help="Use DATA's training images too (--no-data-images: only the --extra-ct renderings).")
@loop_options(_CONFIG, "Seed.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt.")
def pretrain_slice_cmd(data, run_dir, config_path, arch, size, epochs, batch_size, lung_mask, extra_ct, data_images,
                       device, seed, workers, resume):
    """Contrastive (SimCLR) pretraining of the slice encoder on DATA's training images, without labels.

    The encoder in OUT/encoder starts `covidctnet train-slice --init OUT/encoder` (same arch, size, lung mask).
    """
    from covidctnet.core.config import load_config
    from covidctnet.training.simclr import PretrainSliceConfig, pretrain_slice

    overrides = {"arch": arch, "size": size, "epochs": epochs, "batch_size": batch_size, "lung_mask": lung_mask,
                 "extra_ct": extra_ct, "data_images": data_images, "device": device, "seed": seed, "workers": workers}
    cfg = load_config(PretrainSliceConfig, config_path, overrides)
    command = typed_command()
    summary = pretrain_slice(data, run_dir, cfg, resume=resume, command=command)
    if summary.model_dir is not None:
        click.echo(f"pretrain-slice: {summary.epochs_run} epochs, final NT-Xent loss "
                   f"{summary.details['final_loss']:.4f}; encoder: {summary.model_dir}", err=True)
