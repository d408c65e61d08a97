"""``covidctnet import-keras``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli.options import out_option


@click.command("import-keras")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@out_option("Model directory to write (config.yaml, classifier.safetensors, MODEL_CARD.md, SHA256SUMS); an "
                   "existing model directory there is replaced, any other non-empty folder refused.")
@click.option("--denoiser", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A model directory with a 'denoiser' component, or a train-denoiser run directory (a model "
                   "directory inside it, or best.safetensors / model.safetensors / checkpoints/best.pt). Without it "
                   "`predict` cannot use the output until a denoiser is added.")
def import_keras_cmd(weights: Path, out_dir: Path, denoiser: Path | None) -> None:
    """Convert the official CovidCTNet Keras 3D CNN (WEIGHTS.h5) into a model directory.

    The CNN expects 50x128x128 residuals made with `preprocess --profile official`. The official BCDU-Net weights
    were never published, so pair it with a denoiser trained here (--denoiser); the model card says so.
    """
    # Heavy imports (torch, h5py) happen here, not at `covidctnet --help`.
    from covidctnet.models.keras_import import import_keras_model

    md = import_keras_model(weights, out_dir, denoiser=denoiser)
    parts = ", ".join(sorted(md.config["components"]))
    click.echo(f"import-keras: wrote {md.path} ({parts})", err=True)
