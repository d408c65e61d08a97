"""``covidctnet reader-study``: the model against radiologists on the same cases (table, paired tests, kappas, ROC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from covidctnet.cli.options import config_file_option, config_option, out_option

_CONFIG = "covidctnet.evaluation.reader_study:ReaderStudyConfig"
_CSV_FILE = click.Path(dir_okay=False, path_type=Path)

__all__ = ["reader_study_cmd"]


def _csv_option(flag: str, dest: str, help: str, **kwargs: Any) -> Any:  # noqa: A002 (click's name)
    """An option naming one of the study's CSV files."""
    return click.option(flag, dest, type=_CSV_FILE, help=help, **kwargs)


@click.command("reader-study")
@click.argument("reader_files", nargs=-1, type=_CSV_FILE, metavar="[READER.csv]...")
@_csv_option("--model", "model_csv", "The model's report.csv (predict) or preds.csv (predict-slice).", required=True)
@_csv_option(
    "--readers",
    "readers",
    "Reader CSVs (case_id,label[,score]); write --readers R1.csv R2.csv ... (or repeat --readers).",
    multiple=True,
)
@_csv_option("--truth", "truth_csv", "Truth CSV: case_id,label.", required=True)
@out_option("Output folder.")
@config_option(
    _CONFIG,
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    help="The model's 2-class threshold on p_covid; none: argmax of the probabilities.",
)
@config_file_option("reader_study.yaml")
def reader_study_cmd(
    reader_files: tuple[Path, ...],
    model_csv: Path,
    readers: tuple[Path, ...],
    truth_csv: Path,
    out_dir: Path,
    threshold: float | None,
    config_path: Path | None,
) -> None:
    """Compare the model with readers on the same cases, in the layout of the CovidCTNet reader study.

    Writes table.csv (per reader, reader average, majority vote, model: accuracy 2-class and 3-class, sensitivity,
    specificity, AUC with 95% CIs), tests.csv (exact McNemar and DeLong tests of the model against each reader, the
    majority vote and the average reader), agreement.csv (Cohen's kappa per reader pair), metrics.json (with Fleiss'
    kappa), report.md and roc.png to --out. Every file must hold exactly the truth's cases; bad input writes nothing.
    """
    # click options take one value each, so the files after the first `--readers` arrive as arguments: join them
    from covidctnet.core.config import load_config
    from covidctnet.evaluation.reader_study import ReaderStudyConfig, run_reader_study

    cfg = load_config(ReaderStudyConfig, config_path, {"threshold": threshold})
    result = run_reader_study(model_csv, [*readers, *reader_files], truth_csv, out_dir, cfg)
    for row in result["table"]:
        acc = row["accuracy_2class"]["value"]
        auc = row["auc"]["value"]
        acc_text = f"{100 * acc:.1f}%" if acc is not None else "n/a"
        auc_text = f"{auc:.3f}" if auc is not None else "n/a"
        click.echo(f"{row['rater']:<20} accuracy (COVID-19 vs non-COVID) {acc_text:>7}   AUC {auc_text}")
    click.echo(f"report: {out_dir / 'report.md'}")
