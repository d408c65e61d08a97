"""``covidctnet ensemble-slice``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from covidctnet.cli.options import device_option, out_option


@click.command("ensemble-slice")
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option("The ensemble's model directory (for predict-slice --model and export-onnx).")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Dataset whose val split scores the ensemble (UCSD or <split>/<class>/ layout).")
@click.option("--threshold", default=None,
              help="Decision threshold: a number in (0, 1), or 'youden' (chosen on --data's val split by Youden's J)  "
                   "[default: the members' threshold].")
@device_option()
def ensemble_slice_cmd(model_dirs, out_dir, data, threshold, device):
    """Average the COVID probabilities of several slice models (e.g. train-slice runs with different --seed).

    MODEL_DIRS are train-slice model directories (RUN/model) of one architecture and preprocessing.
    """
    from covidctnet.training.slice_ensemble import ensemble_slice_models

    if threshold is not None and threshold != "youden":
        try:
            threshold = float(threshold)
        except ValueError:
            raise click.BadParameter(f"{threshold!r}: a number in (0, 1) or 'youden'", param_hint="--threshold")
    result = ensemble_slice_models(model_dirs, out_dir, data=data, device=device, threshold=threshold,
                                   command=shlex.join(["covidctnet", *sys.argv[1:]]))
    val = result["val"]
    click.echo(f"ensemble-slice: {result['members']} members -> {result['model_dir']}, "
               f"threshold {result['threshold']:.4g}"
               + (f"; val accuracy {val['accuracy']:.3f}, F1 {val['f1']:.3f}, AUC {val['auc']:.3f} (n={int(val['n'])})"
                  if val else ""), err=True)
