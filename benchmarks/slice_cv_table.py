"""The out-of-fold table of several ``covidctnet cv-slice`` runs on the same folds, with paired tests against one.

Reads each run's ``cv_metrics.json`` and ``oof_preds.csv`` (written by :func:`covidctnet.training.slice_cv.cv_slice`)
and prints a Markdown table: pooled out-of-fold AUC with its cluster-bootstrap and DeLong 95% CIs, accuracy and F1
at the nested thresholds (cluster CIs), the same at Youden's J on all out-of-fold predictions (optimistic), the
paired difference in AUC against the reference run (DeLong p and paired cluster-bootstrap CI) and training time.

Usage::

    .venv/bin/python benchmarks/slice_cv_table.py RUN_A RUN_B RUN_C --reference RUN_A
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidctnet.training.slice_cv import compare_cv_runs


def _ci(fig: dict) -> str:
    return f"{100 * fig['value']:.1f} ({100 * fig['cluster_ci'][0]:.1f}-{100 * fig['cluster_ci'][1]:.1f})"


def table(runs: list[Path], reference: Path) -> str:
    lines = ["| variant | OOF AUC (cluster CI) | DeLong CI | accuracy, nested (CI) | F1, nested (CI) | "
             "accuracy / F1 at pooled Youden (optimistic) | ΔAUC vs " + reference.name + " (paired cluster CI) | "
             "DeLong p | per-fold AUC | training (min, 5 folds) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        m = json.loads((run / "cv_metrics.json").read_text())
        if run.resolve() == reference.resolve():
            diff, p = "reference", ""
        else:
            c = compare_cv_runs(run, reference)
            diff = f"{100 * c['difference']:+.1f} ({100 * c['cluster_ci'][0]:+.1f} to {100 * c['cluster_ci'][1]:+.1f})"
            p = f"{c['delong_p']:.2f}"
        d = m["auc_delong_ci"]
        folds = ", ".join(f"{100 * a:.0f}" for a in m["fold_auc"])
        lines.append(f"| {run.name} | {_ci(m['auc'])} | {100 * d[0]:.1f}-{100 * d[1]:.1f} | "
                     f"{_ci(m['accuracy_nested'])} | {_ci(m['f1_nested'])} | "
                     f"{100 * m['accuracy_pooled_youden']['value']:.1f} / {100 * m['f1_pooled_youden']['value']:.1f} | "
                     f"{diff} | {p} | {folds} | {m['training_seconds']['total'] / 60:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reference", type=Path, required=True)
    args = parser.parse_args()
    print(table(args.runs, args.reference))


if __name__ == "__main__":
    main()
