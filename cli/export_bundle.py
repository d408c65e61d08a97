"""``covidctnet export-bundle``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli.options import out_option


@click.command("export-bundle")
@click.argument("model_dir", type=click.Path(path_type=Path))
@out_option("Bundle folder to write (configs/metadata.json, configs/inference.json, models/, docs/README.md).")
@click.option("--version", "bundle_version", default="0.1.0", show_default=True,
              help="The bundle's version in configs/metadata.json.")
def export_bundle_cmd(model_dir, out_dir, bundle_version):
    """Write a predict model directory (denoiser + 3D classifier) or a slice model directory as a MONAI bundle.

    The bundle runs with `python -m monai.bundle run --config_file configs/inference.json --input CT.nii.gz` from its
    folder and writes eval/report.csv as `covidctnet predict` does. Its metadata is checked against MONAI's schema
    (a copy shipped with covidctnet; nothing is downloaded) before the bundle is written; no shipped file names an
    absolute path.
    """
    # torch and MONAI are imported inside the library call: `covidctnet --help` stays instant
    from covidctnet.inference.bundle import export_bundle

    result = export_bundle(model_dir, out_dir, bundle_version=bundle_version)
    click.echo(f"{result.out_dir}: MONAI bundle ({result.task}), model sha256 {result.weights_sha256[:12]}…"
               + (f"; made relative: {', '.join(result.rewritten)}" if result.rewritten else ""))
