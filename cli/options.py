"""Options shared by the commands, and options that override one field of a command's config dataclass.

A config-backed option has no default of its own: unset means "the value of the config" (the dataclass default,
then ``--config`` YAML), and ``--help`` shows the dataclass default, read when the help is rendered. So every default
is written once, in the dataclass, and ``covidctnet --help`` still imports no torch.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import click

__all__ = ["ConfigOption", "config_option", "out_option", "config_file_option", "device_option", "dataclass_default",
           "loader_workers_option", "resolve_ref", "batch_options", "step_options", "transfer_options",
           "transfer_inputs", "SLICE_ARCHS", "slice_arch_option", "loop_options", "resumable_run_options",
           "resumed_config_path"]

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N (gpu = cuda)"


def resolve_ref(ref: str) -> Any:
    """The object at ``"module:attribute"`` (imports the module)."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def _static_defaults(ref: str) -> dict[str, Any]:
    """Field defaults of the dataclass at ``ref``, read from its source without importing the module.

    A command's ``--help`` then stays instant: the config modules import torch and MONAI at the top. Only literal
    defaults are read (numbers, strings, booleans, None, tuples); ``tests/cli/test_cli_options.py`` checks every value
    shown against the imported dataclass.
    """
    module, name = ref.split(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"{module}: module not found")
    tree = ast.parse(Path(spec.origin).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    out = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            try:
                out[node.target.id] = ast.literal_eval(node.value)
            except ValueError:  # field(default_factory=...): no option shows it
                continue
    return out


def dataclass_default(ref: str, key: str) -> Any:
    """The default of field ``key`` of the dataclass at ``ref`` (``"module:Class"``), without importing it."""
    return _static_defaults(ref)[key]


def _shown(option: click.Option, value: Any) -> str:
    if option.is_flag and option.secondary_opts and isinstance(value, bool):
        return (option.opts if value else option.secondary_opts)[-1].lstrip("-")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


class ConfigOption(click.Option):
    """An option that overrides field ``key`` of the config dataclass ``config`` (``"module:Class"``).

    Its value is ``None`` unless given, so that ``load_config(cls, yaml, {key: value})`` keeps the YAML's value;
    ``--help`` appends ``[default: <the dataclass default>]``. ``old_names`` are earlier names of the option: still
    accepted, not shown.
    """

    def __init__(self, *args: Any, config: str, key: str | None = None, old_names: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        kwargs["default"] = None
        kwargs["show_default"] = False
        decls, *rest = args  # click passes the declarations as one list
        super().__init__([*decls, *old_names], *rest, **kwargs)
        self.config_ref = config
        self.config_key = key or self.name
        self.old_names = old_names

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        # an old name still works (scripts keep running) but --help shows one name per meaning
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.old_names]
        try:
            record = super().get_help_record(ctx)
        finally:
            self.opts = shown
        if record is None:
            return None
        default = _shown(self, dataclass_default(self.config_ref, self.config_key))
        return record[0], f"{record[1]}  [default: {default}]".lstrip()


def config_option(config: str, *decls: str, key: str | None = None, **kwargs: Any) -> Any:
    """``click.option`` for a :class:`ConfigOption` of ``config``."""
    return click.option(*decls, cls=ConfigOption, config=config, key=key, **kwargs)


def out_option(help: str, dest: str = "out_dir", **kwargs: Any) -> Any:  # noqa: A002 (click's name)
    """``-o/--out FOLDER``, required unless a default is given."""
    kwargs.setdefault("required", "default" not in kwargs)
    return click.option("-o", "--out", dest, type=click.Path(file_okay=False, path_type=Path), help=help, **kwargs)


def config_file_option(yaml_name: str, extra: str = "") -> Any:
    """``--config FILE``: a YAML overriding ``configs/<yaml_name>`` (see ``covidctnet defaults``)."""
    return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        help=f"YAML overriding configs/{yaml_name} (`covidctnet defaults "
                             f"{yaml_name.removesuffix('.yaml')}` prints it){extra}.")


def device_option(config: str | None = None) -> Any:
    """``--device``: a config-backed option when the command's config has ``device``, else defaulting to auto."""
    if config is not None:
        return config_option(config, "--device", help=DEVICE_HELP + ".")
    return click.option("--device", default="auto", show_default=True, help=DEVICE_HELP + ".")


BACKEND_HELP = ("Where the networks run. auto: PyTorch on CUDA; on the CPU, OpenVINO fp32 when installed, else "
                "onnxruntime fp32 (both about 1.5x PyTorch's CPU speed, results equal within 1e-4), else PyTorch. "
                "The CPU runtimes run an ONNX export of the model, built and checked once into "
                "$XDG_CACHE_HOME/covidctnet (~/.cache/covidctnet when unset; delete that folder to clear it). torch, "
                "onnx, openvino force one (onnx and openvino also take an `export-onnx` folder as the model).")


def backend_option(config: str | None = None, choices: tuple[str, ...] = ("auto", "torch", "onnx", "openvino"),
                   extra: str = "") -> Any:
    """``--backend`` (``covidctnet.inference.backends``; the table of what ``auto`` picks is in its docstring and the
    README): a config-backed option when the command's config has ``backend``, else defaulting to auto."""
    kwargs = {"type": click.Choice(list(choices)), "help": BACKEND_HELP + extra}
    if config is not None:
        return config_option(config, "--backend", **kwargs)
    return click.option("--backend", default="auto", show_default=True, **kwargs)


def loader_workers_option(config: str, key: str = "workers") -> Any:
    """``--loader-workers``: DataLoader worker processes of a training command (``--workers`` means processes that
    each run whole studies, in preprocess / residuals / predict; the training commands' old ``--workers`` still works).
    """
    return config_option(config, "--loader-workers", key, key=key, old_names=("--workers",), type=int,
                         help="DataLoader worker processes (0 = load in the training process).")


def step_options(config: str) -> Any:
    """``--max-steps`` and ``--checkpoint-every`` of the long training commands (one MosMed epoch is ~15,000 steps)."""
    max_steps = config_option(config, "--max-steps", type=int,
                              help="Stop after this many optimiser steps in all (the last epoch may be partial).")
    every = config_option(config, "--checkpoint-every", type=int,
                          help="Also checkpoint every N optimiser steps; --resume then continues inside the epoch.")
    return lambda f: max_steps(every(f))


SLICE_ARCHS: tuple[str, ...] = ("densenet121", "densenet169", "resnet18", "resnet50")
"""The slice commands' networks: :data:`covidctnet.models.slice.SLICE_ARCHS`, written again here because importing
that module loads torch (``tests/models/test_slice.py`` checks that both lists are equal)."""


def slice_arch_option(config: str) -> Any:
    """``--arch``: one of :data:`SLICE_ARCHS` (train-slice, pretrain-slice, cv-slice)."""
    return config_option(config, "--arch", type=click.Choice(list(SLICE_ARCHS)), help="MONAI 2D network.")


def _stacked(options: list[Any]) -> Any:
    """One decorator applying ``options`` (click option decorators) so that ``--help`` lists them in this order."""

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def loop_options(config: str, seed_help: str) -> Any:
    """``--device``, ``--seed`` (help ``seed_help``) and ``--loader-workers`` of the slice training commands: where
    the loop runs, its seed and its DataLoader workers."""
    return _stacked([device_option(config), config_option(config, "--seed", type=int, help=seed_help),
                     loader_workers_option(config)])


def resumable_run_options(config: str, yaml_name: str, out_help: str) -> Any:
    """The run-folder and loop options of train-denoiser and train-lesion-model, in this order: ``-o RUN_DIR``,
    ``--config`` (with ``--resume``: the run's own ``config.yaml``, see :func:`resumed_config_path`), ``--device``,
    ``--epochs``, ``--loader-workers`` (config key ``num_workers``), ``--max-steps`` and ``--checkpoint-every``."""
    options = [
        out_option(out_help, "run_dir"),
        config_file_option(yaml_name, "; with --resume, RUN_DIR/config.yaml"),
        device_option(config),
        config_option(config, "--epochs", type=int, help="Total epochs (overrides the config)."),
        loader_workers_option(config, key="num_workers"),
        step_options(config),
    ]
    return _stacked(options)


def resumed_config_path(config_path: Path | None, run_dir: Path, resume: bool) -> Path | None:
    """The YAML a run's config is read from: ``--config`` when given, else on ``--resume`` the run's own
    ``RUN_DIR/config.yaml`` (a resumed run keeps its own settings), else none (the dataclass defaults)."""
    if config_path is None and resume and (run_dir / "config.yaml").is_file():
        return run_dir / "config.yaml"
    return config_path


def batch_options(workers_help: str, resume_help: str) -> Any:
    """``--workers``, ``--scheduler`` and ``--resume/--no-resume`` of the batch commands (preprocess, residuals,
    predict): how the studies are spread over processes or a Dask cluster, and whether finished ones are skipped."""
    options = [
        click.option("--workers", type=int, default=0, show_default=True, help=workers_help),
        click.option("--scheduler", default=None, help="Dask scheduler address (tcp://host:8786): run the studies on "
                                                       "that cluster instead of --workers."),
        click.option("--resume/--no-resume", default=True, show_default=True, help=resume_help),
    ]

    return _stacked(options)


_TRANSFER = "covidctnet.io.dicomweb:TransferConfig"


def transfer_options(store: bool = False) -> Any:
    """The DICOMweb options of the commands that read studies (``--query``, ``--keep-download``, ``--timeout``,
    ``--insecure``) and, with ``store``, ``predict``'s ``--store-to`` and ``--ae-title``; see
    :mod:`covidctnet.io.dicomweb` (credentials come from the environment or ~/.netrc, never from an option)."""
    options = [
        click.option("--query", "query", multiple=True, metavar="FIELD=VALUE",
                     help="QIDO-RS filter for a DICOMweb server's base URL among the inputs (dicomweb+http://HOST:PORT/"
                          "dicom-web): every matching study is read (repeatable; e.g. StudyDate=20200411)."),
        config_option(_TRANSFER, "--keep-download", "keep_download", type=click.Path(file_okay=False),
                      help="Keep each study retrieved from DICOMweb in DIR/<study_id>/ (else a temporary folder, "
                           "deleted afterwards)."),
        config_option(_TRANSFER, "--timeout", "timeout", type=float,
                      help="Seconds to wait for a PACS connection or answer (every request is tried 3 times)."),
        config_option(_TRANSFER, "--insecure", "insecure", is_flag=True,
                      help="Do not verify the DICOMweb server's TLS certificate (warned; for a server you trust)."),
    ]
    if store:
        options += [
            config_option(_TRANSFER, "--store-to", "store_to", metavar="TARGET",
                          help="Store each study's SR and SEG (--dicom-out) on a PACS: dicomweb+http(s)://HOST:PORT/"
                               "PREFIX (STOW-RS) or dimse://AET@HOST:PORT (C-STORE)."),
            config_option(_TRANSFER, "--ae-title", "ae_title", help="Calling AE title of C-STORE (--store-to dimse://)."),
        ]

    return _stacked(options)


def transfer_inputs(inputs: Any, query: tuple[str, ...] = (), **given: Any) -> tuple[list[Any], Any]:
    """``(inputs with each DICOMweb URL bound to the settings, TransferConfig)`` from :func:`transfer_options`'
    values (unset ones keep the dataclass default)."""
    from covidctnet.io.dicomweb import TransferConfig, remote_inputs

    cfg = TransferConfig(query=tuple(query), **{k: v for k, v in given.items() if v is not None})
    return remote_inputs(inputs, cfg), cfg
