"""``covidctnet evaluate``: metrics with confidence intervals, confusion matrix and ROC curves of a predictions CSV."""

from __future__ import annotations

from pathlib import Path

import click

from covidctnet.cli.options import config_file_option, config_option, out_option

_CONFIG = "covidctnet.evaluation.evaluate:EvaluateConfig"

__all__ = ["evaluate_cmd"]


@click.command("evaluate")
@click.argument("predictions", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--labels",
    "labels",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Labels CSV: study_id,label, case_id,label or file,label (image paths or names, matched to preds.csv by "
    "relative path, then by name with or without extension); control/covid/cap (aliases accepted) or covid/noncovid.",
)
@out_option("Report folder.")
# float, not click.FloatRange: EvaluateConfig's range check gives the one-line error (exit 2) every bad input gets
@config_option(
    _CONFIG,
    "--threshold",
    type=float,
    help="2-class threshold on p_covid in [0, 1] (COVID-19 when p_covid >= T); none: the threshold column of "
    "preds.csv if it has one, else the argmax of the probabilities.",
)
@config_file_option("evaluate.yaml")
def evaluate_cmd(predictions: Path, labels: Path, out_dir: Path, threshold: float | None,
                 config_path: Path | None) -> None:
    """Score PREDICTIONS (report.csv from predict, or OUT/preds.csv from predict-slice) against --labels.

    Writes report.md (and report.html, the same page with its figures embedded), metrics.json, config.yaml and PNGs
    (ROC curves, confusion matrices) to --out: 2-class (COVID-19 vs the rest) and 3-class accuracy, sensitivity,
    specificity, precision, F1 and AUC with 95% CIs (Wilson for proportions, DeLong for AUC). Rows with status=error are excluded and counted. Bad input writes nothing.
    The 2-class threshold is --threshold, else the one preds.csv records (the one predict-slice applied), else
    the argmax.
    """
    # the library (numpy, scipy, matplotlib) is imported here so that `covidctnet --help` stays instant
    from covidctnet.core.config import load_config
    from covidctnet.evaluation.evaluate import EvaluateConfig, evaluate
    from covidctnet.evaluation.report_md import format_estimate

    cfg = load_config(EvaluateConfig, config_path, {"threshold": threshold})
    result = evaluate(predictions, labels, out_dir, cfg)
    two = result["two_class"]["metrics"]

    def show(key: str, percent: bool = True) -> str:
        from covidctnet.evaluation.stats import Estimate

        if key not in two:
            return "n/a"
        value, ci, _ = format_estimate(Estimate(**two[key]), percent)
        return f"{value} ({ci})"

    excluded = len(result["inputs"]["excluded"])
    click.echo(
        f"{result['inputs']['n_evaluated']} cases evaluated"
        + (f", {excluded} excluded (status error/skipped)" if excluded else "")
    )
    if result.get("threshold") is not None:
        click.echo(f"threshold {result['threshold']:.6g} ({result['threshold_source']})")
    click.echo(
        f"COVID-19 vs rest: accuracy {show('accuracy')}, sensitivity {show('sensitivity')}, "
        f"specificity {show('specificity')}, AUC {show('auc', percent=False)}"
    )
    if result.get("three_class"):
        from covidctnet.evaluation.stats import Estimate

        value, ci, _ = format_estimate(Estimate(**result["three_class"]["accuracy"]))
        click.echo(f"3-class accuracy {value} ({ci})")
    click.echo(f"report: {out_dir / 'report.md'}  {out_dir / 'report.html'}")
