"""``covidctnet cv-slice``."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli._common import typed_command
from covidctnet.cli.options import config_file_option, config_option, loop_options, out_option, slice_arch_option

_CONFIG = "covidctnet.training.slice:SliceTrainConfig"


@click.command("cv-slice")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@out_option("Run folder: folds.csv, fold*/, oof_preds.csv, cv_metrics.json, roc.png, confusion.png, model/.",
            "out_dir")
@config_file_option("slice.yaml")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Number of folds (K).")
@click.option("--fold-seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.option("--only-fold", "only_folds", type=int, multiple=True,
              help="Train only this fold (repeatable); finished folds in OUT are always reused.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A finished cv-slice run on the same folds to test against (paired DeLong and cluster bootstrap).")
@slice_arch_option(_CONFIG)
@config_option(_CONFIG, "--image-size", "size", key="size", type=int, help="Square input size in pixels.")
@config_option(_CONFIG, "--epochs", type=int, help="Training epochs per fold (the last one is kept).")
@config_option(_CONFIG, "--lung-mask/--no-lung-mask", help="Add a classical lung mask as a 2nd input channel.")
@config_option(_CONFIG, "--source-aug/--no-source-aug", help="Augmentations mimicking the source papers' figures.")
@click.option("--init", "init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Model directory from pretrain-slice whose encoder starts every fold.")
@loop_options(_CONFIG, "Seed of weights, data order and augmentation (every fold).")
def cv_slice_cmd(data, out_dir, config_path, folds, fold_seed, only_folds, reference, arch, size, epochs, lung_mask,
                 source_aug, init, device, seed, workers):
    """Grouped K-fold cross-validation of the train-slice recipe on DATA's train + val images.

    Groups (source paper, figure) never straddle folds; every image gets one out-of-fold prediction. Writes the
    out-of-fold AUC, accuracy and F1 with CIs, per-fold figures, and OUT/model: the ensemble of the K fold models,
    whose card gives the out-of-fold estimate as its expected performance.
    """
    from covidctnet.core.config import load_config
    from covidctnet.training.slice import SliceTrainConfig
    from covidctnet.training.slice_cv import cv_slice

    overrides = {"arch": arch, "size": size, "epochs": epochs, "lung_mask": lung_mask, "source_aug": source_aug,
                 "init": str(init) if init else None, "device": device, "seed": seed, "workers": workers}
    cfg = load_config(SliceTrainConfig, config_path, overrides)
    command = typed_command()
    result = cv_slice(data, out_dir, cfg, folds=folds, fold_seed=fold_seed, only_folds=only_folds or None,
                      reference=reference, command=command)
    if "auc" not in result:
        click.echo(f"cv-slice: folds done {result['folds_done']} of {folds}", err=True)
        return
    a, acc, f1 = result["auc"], result["accuracy_nested"], result["f1_nested"]
    click.echo(f"cv-slice: out-of-fold AUC {100 * a['value']:.1f} ({100 * a['cluster_ci'][0]:.1f}-"
               f"{100 * a['cluster_ci'][1]:.1f}), accuracy {100 * acc['value']:.1f}%, F1 {100 * f1['value']:.1f} "
               f"(n={result['n']}); ensemble: {out_dir / 'model'}", err=True)
