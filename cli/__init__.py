"""The ``covidctnet`` command group.

Only click and the standard library are imported here and in the command modules' top level: torch and MONAI are
imported inside each command, so ``covidctnet --help`` answers at once. Each command parses its options and calls
one library function. Library errors (``CovidCTNetError``) become one line on stderr and the error's exit code
(2 = bad input or usage, 1 = some studies of a batch failed); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

__all__ = ["cli", "main", "COMMANDS"]

# name -> "module:function"; modules are imported only when the command (or the help listing) needs them.
COMMANDS: dict[str, str] = {
    "preprocess": "covidctnet.cli.preprocess:preprocess_cmd",
    "train-denoiser": "covidctnet.cli.train_denoiser:train_denoiser_cmd",
    "train-lesion-model": "covidctnet.cli.train_lesion_model:train_lesion_model_cmd",
    "residuals": "covidctnet.cli.residuals:residuals_cmd",
    "predict": "covidctnet.cli.predict:predict_cmd",
    "demo": "covidctnet.cli.predict:demo_cmd",
    "import-keras": "covidctnet.cli.import_keras:import_keras_cmd",
    "train-slice": "covidctnet.cli.train_slice:train_slice_cmd",
    "pretrain-slice": "covidctnet.cli.pretrain_slice:pretrain_slice_cmd",
    "predict-slice": "covidctnet.cli.predict_slice:predict_slice_cmd",
    "ensemble-slice": "covidctnet.cli.ensemble_slice:ensemble_slice_cmd",
    "cv-slice": "covidctnet.cli.cv_slice:cv_slice_cmd",
    "calibrate-cam": "covidctnet.cli.calibrate_cam:calibrate_cam_cmd",
    "train-classifier": "covidctnet.cli.train_classifier:train_classifier_cmd",
    "evaluate": "covidctnet.cli.evaluate:evaluate_cmd",
    "reader-study": "covidctnet.cli.reader_study:reader_study_cmd",
    "export-onnx": "covidctnet.cli.export_onnx:export_onnx_cmd",
    "export-bundle": "covidctnet.cli.export_bundle:export_bundle_cmd",
    "defaults": "covidctnet.cli.defaults:defaults_cmd",
    "slice-scores": "covidctnet.cli.slice_scores:slice_scores_cmd",
    "validate-residuals": "covidctnet.cli.validate_residuals:validate_residuals_cmd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not any(p.name == "global_verbose" for p in command.params):
            command.params.extend(_global_params())  # `covidctnet predict ... -q` as well as `covidctnet -q predict`
        return command

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from covidctnet.core.errors import CovidCTNetError

        try:
            return super().invoke(ctx)
        except CovidCTNetError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = " ".join(str(err).split("\n"))
            exc = click.ClickException(message)
            exc.exit_code = err.exit_code
            raise exc from None
        except MemoryError:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            exc = click.ClickException("out of memory; try a smaller --batch-size or fewer --workers")
            exc.exit_code = 1
            raise exc from None


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.INFO if verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)  # basicConfig sets it only once per process
    # Library chatter from third parties stays at WARNING unless -vv.
    for noisy in ("monai", "matplotlib", "PIL", "h5py", "distributed"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def _global_params() -> list[click.Option]:
    """-v, -q and --debug again on every command, so they work after the command name too (hidden from its help)."""

    def apply(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        root = ctx.find_root()
        root.ensure_object(dict)
        if param.name == "global_debug":
            root.obj["debug"] = root.obj.get("debug", False) or bool(value)
            return
        if param.name == "global_verbose" and value:
            root.obj["verbose"] = root.obj.get("verbose", 0) + value
        elif param.name == "global_quiet" and value:
            root.obj["quiet"] = True
        else:
            return
        _configure_logging(root.obj.get("verbose", 0), root.obj.get("quiet", False))

    return [
        click.Option(["-v", "--verbose", "global_verbose"], count=True, hidden=True, expose_value=False,
                     callback=apply),
        click.Option(["-q", "--quiet", "global_quiet"], is_flag=True, hidden=True, expose_value=False, callback=apply),
        click.Option(["--debug", "global_debug"], is_flag=True, hidden=True, expose_value=False, callback=apply),
    ]


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    package_name="covidctnet", message="covidctnet %(version)s — cite Javaheri et al., npj Digit. Med. 4, 29 (2021)"
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """CovidCTNet: COVID-19 / CAP / control diagnosis from chest CT scans."""
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, verbose=verbose, quiet=quiet)
    _configure_logging(verbose, quiet)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="covidctnet")
