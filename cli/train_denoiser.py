"""``covidctnet train-denoiser``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli.options import resumable_run_options, resumed_config_path

_CONFIG = "covidctnet.training.denoiser:DenoiserConfig"


@click.command("train-denoiser")
@click.argument("data", type=click.Path(path_type=Path))
@resumable_run_options(_CONFIG, "denoiser.yaml",
                       "Run folder: checkpoints/, metrics.csv, loss_curve.png, samples/, and model/ at the end.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="labels CSV (study_id,label): train on its 'control' studies.")
@click.option("--studies", default=None, help="Comma-separated control study ids (overrides labels).")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from checkpoints/last.pt.")
def train_denoiser_cmd(data, run_dir, config_path, device, epochs, num_workers, max_steps, checkpoint_every,
                       labels_path, studies, resume):
    """Train the BCDU-Net denoiser on the control slices of DATA (a `covidctnet preprocess` folder).

    Half of each batch gets Perlin noise, the target is always the clean slice (the official CovidCTNet recipe).
    Validation on held-out control slices: loss, PSNR and SSIM, against the noisy-input baseline. Multi-GPU or
    multi-node: `torchrun --nproc_per_node N -m covidctnet train-denoiser ...`.
    """
    # Heavy imports (torch, MONAI) happen here, not at `covidctnet --help`.
    from covidctnet.core.config import load_config
    from covidctnet.training.denoiser import DenoiserConfig, train_denoiser

    overrides = {"epochs": epochs, "device": device, "num_workers": num_workers, "max_steps": max_steps,
                 "checkpoint_every": checkpoint_every}
    cfg = load_config(DenoiserConfig, resumed_config_path(config_path, run_dir, resume), overrides)
    ids = [s.strip() for s in studies.split(",") if s.strip()] if studies else None
    result = train_denoiser(data, run_dir, cfg, labels=labels_path, studies=ids, resume=resume,
                            command=" ".join(["covidctnet", *sys.argv[1:]]) if sys.argv else None)
    if result.model_dir is not None:
        v = result.val
        click.echo(f"train-denoiser: best epoch {result.best_epoch} of {result.epochs_run}; held-out PSNR "
                   f"{v.get('val_psnr', float('nan')):.2f} dB denoised vs {v.get('val_psnr_noisy', float('nan')):.2f}"
                   f" dB noisy, SSIM {v.get('val_ssim', float('nan')):.4f} vs "
                   f"{v.get('val_ssim_noisy', float('nan')):.4f}; model directory: {result.model_dir}", err=True)
