"""Helpers shared by the commands (click and stdlib only)."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click


def echo_error_row(row: dict[str, Any]) -> None:
    """Print one failed study as a single line on stderr, as it happens."""
    if row.get("status") == "error":
        click.echo(f"Error: {row['error']}", err=True)


def batch_exit(summary: Any) -> int:
    """Exit code of a batch: 0 all ok, 1 some studies failed, 2 every study failed (bad input)."""
    if summary.n_failed == 0:
        return 0
    return 2 if summary.n_ok + summary.n_skipped == 0 else 1


def bundled_model_notice(what: str) -> None:
    """One line on stderr whenever a command runs a bundled demonstration model, so that no output is mistaken for a
    diagnosis."""
    click.echo(f"Note: using the bundled {what}, a demonstration trained on a handful of scans: not diagnostic "
               "(pass --model MODEL_DIR for your own model).", err=True)


def typed_command() -> str | None:
    """The command line as typed (``covidctnet`` and the arguments, shell-quoted), for a run's config and model card;
    ``None`` when the process has no arguments (a library call)."""
    return "covidctnet " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
