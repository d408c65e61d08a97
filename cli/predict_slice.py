"""``covidctnet predict-slice``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from covidctnet.cli._common import bundled_model_notice
from covidctnet.cli.options import backend_option, device_option


@click.command("predict-slice")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Slice model directory  [default: the bundled demonstration slice model].")
# Not options.out_option: its click.Path(file_okay=False) turns an existing file into a multi-line usage error; the
# library says it in one line instead (exit 2).
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), metavar="DIRECTORY",
              help="Output folder: gets preds.csv (file, p_covid, predicted, status, error, model, weights_sha256, "
                   "threshold).")
@click.option("--cam", "cam_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write Grad-CAM overlays into this folder: <stem>_cam.png (evidence for COVID-19 in log-odds per "
                   "region on the model's recorded colour scale, cam_scale; title: p_covid, threshold, call) and "
                   "<stem>_cam.npy (the raw map, float32).")
# float, not click.FloatRange: the library's range check gives the one-line error every bad input gets
@click.option("--threshold", type=float, default=None,
              help="p_covid threshold in [0, 1] (COVID-19 when p_covid >= T)  [default: the model's threshold].")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per forward pass.")
@device_option()
@backend_option(extra=" --cam needs PyTorch (auto then picks it).")
def predict_slice_cmd(inputs, model_dir, out_dir, cam_dir, threshold, batch_size, device, backend):
    """Score CT slice images (files or folders of PNG/JPG) for COVID-19 into OUT/preds.csv.

    A bad image gets an error row (status=error) and the others go on; the exit code is then 1 (2 if all failed,
    and then nothing is written). `covidctnet evaluate OUT/preds.csv --labels labels.csv` reads the file as it is.
    """
    from covidctnet.inference.predict_slice import predict_slices

    summary = predict_slices(inputs, out_dir, model_dir=model_dir, cam_dir=cam_dir, device=device,
                             batch_size=batch_size, threshold=threshold, backend=backend,
                             on_error=lambda message: click.echo(f"Error: {message}", err=True))
    click.echo(f"predict-slice: {summary.n_ok} scored, {summary.n_failed} failed"
               + (f"; {summary.out_csv} (threshold {summary.threshold:.4g})" if summary.n_ok else "; nothing written")
               + (f"; {len(summary.cams)} Grad-CAM PNGs in {cam_dir}" if cam_dir else ""), err=True)
    if model_dir is None and summary.n_ok:  # after the run: a bad input stays one line
        bundled_model_notice("slice model (covidctnet/assets/slice_model)")
    if summary.n_failed:
        sys.exit(2 if summary.n_ok == 0 else 1)
