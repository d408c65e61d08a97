"""``covidctnet export-onnx``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli.options import out_option


@click.command("export-onnx")
@click.argument("model_dir", type=click.Path(path_type=Path))
@out_option("ONNX model directory to write (*.onnx, onnx.json, and the source's config.yaml, MODEL_CARD.md, "
                   "SHA256SUMS).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset version.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Largest accepted |onnxruntime - PyTorch| on a random check batch; a larger one refuses the export.")
@click.option("--int8-calibration", "int8_calibration", multiple=True, type=click.Path(path_type=Path),
              metavar="SCAN", help="Control CT scans (DICOM folders, NIfTI files; repeat the option): also write an "
              "int8 denoiser calibrated on them, refused unless it passes the accuracy gate on them (residual "
              "correlation >= 0.99, probabilities within 0.01 of fp32). Run it with predict --precision int8.")
@click.option("--calibration-slices", type=int, default=32, show_default=True,
              help="Slices of the calibration scans the int8 ranges are taken from.")
def export_onnx_cmd(model_dir, out_dir, opset, tolerance, int8_calibration, calibration_slices):
    """Export a predict model directory (denoiser + 3D classifier) or a slice model directory to ONNX.

    Every network gets a dynamic batch axis, is checked with onnx.checker and compared with PyTorch through
    onnxruntime before anything is written. Use the result with `covidctnet predict --backend onnx --model OUT`
    (or `predict-slice --backend onnx --model OUT`).
    """
    # torch and onnx are imported inside the library call: `covidctnet --help` stays instant
    from covidctnet.inference.onnx_export import export_onnx

    result = export_onnx(model_dir, out_dir, opset=opset, tolerance=tolerance, int8_calibration=int8_calibration,
                         calibration_slices=calibration_slices)
    for name, entry in result.components.items():
        check = (f"max |onnxruntime - PyTorch| {entry['max_abs_diff']:.1e}" if "max_abs_diff" in entry else
                 "gate: " + ", ".join(f"{g['study']} correlation {g['residual_correlation']:.4f}, probabilities "
                                      f"within {g['max_probability_change']:.4f}" for g in entry["gate"]))
        click.echo(f"{name}: {result.out_dir / entry['file']}  (input {entry['input_shape']}, {check})")
