"""``covidctnet calibrate-cam``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli.options import config_file_option, config_option, device_option

_CONFIG = "covidctnet.models.grad_cam:CamScaleConfig"


@click.command("calibrate-cam")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_file_option("cam_scale.yaml")
@config_option(_CONFIG, "--percentile", type=float,
               help="Top of the colour range: this percentile of the model's Grad-CAM values.")
@config_option(_CONFIG, "--show-from", "show_from", type=float,
               help="Colour only where the map is at least this fraction of the top.")
@device_option()
def calibrate_cam_cmd(model_dir, data, config_path, percentile, show_from, device):
    """Record the Grad-CAM colour scale of slice model MODEL_DIR (cam_scale in its config.yaml) from the images it
    was validated on in DATA: a cv-slice ensemble's out-of-fold images (train + val), else the val split.

    predict-slice --cam then draws every map of this model on that one scale.
    """
    from covidctnet.core.config import load_config
    from covidctnet.models.grad_cam import CamScaleConfig
    from covidctnet.training.slice_cam import calibrate_cam

    cfg = load_config(CamScaleConfig, config_path, {"percentile": percentile, "show_from": show_from})
    scale = calibrate_cam(model_dir, data, cfg, device=device)
    click.echo(f"calibrate-cam: {model_dir}: colour range 0-{scale.value:.4g} {scale.unit} ({scale.describe()}), "
               f"coloured from {scale.floor:.4g}", err=True)
