"""Command-line defaults come from the config dataclasses: `--help` shows them, and none is typed by hand."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import click
import pytest

from covidctnet.cli import COMMANDS, cli
from covidctnet.cli.options import ConfigOption, dataclass_default, resolve_ref

CONTEXT = click.Context(cli)


def _options():
    for name in sorted(COMMANDS):
        command = cli.get_command(CONTEXT, name)
        for param in command.params:
            if isinstance(param, click.Option):
                yield name, param


@pytest.mark.parametrize(("command", "option"), [(c, o) for c, o in _options() if isinstance(o, ConfigOption)],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_config_option_shows_the_dataclass_default(command, option):
    # the value --help shows is read from the source; it must be the imported dataclass's default
    fields = {f.name: f for f in dataclasses.fields(resolve_ref(option.config_ref))}
    default = fields[option.config_key].default  # also: the key is a field of that config
    assert dataclass_default(option.config_ref, option.config_key) == default
    help_text = option.get_help_record(click.Context(cli.get_command(CONTEXT, command)))[1]
    shown = re.search(r"\[default: ([^\]]*)\]$", help_text)
    assert shown, help_text
    if isinstance(default, bool) and option.secondary_opts:  # --flag/--no-flag: the name of the default side
        expected = (option.opts if default else option.secondary_opts)[-1].lstrip("-")
    elif isinstance(default, bool) or default is None:
        expected = str(default).lower()
    else:
        expected = str(default)
    assert shown.group(1) == expected
    assert option.default is None  # unset keeps the value of --config's YAML


def test_no_default_is_typed_by_hand():
    for command, option in _options():
        record = option.get_help_record(click.Context(cli.get_command(CONTEXT, command)))
        if record is None:
            continue
        text = record[1]
        generated = isinstance(option, ConfigOption) or option.show_default
        mentions = len(re.findall(r"\[default:|\(default", text, flags=re.I))
        # one "[default: …]" at the end, from the dataclass or click; a hand-typed one only where no value exists
        # (the bundled model, the model's or members' own threshold)
        if not generated:
            assert mentions == 0 or re.search(r"\[default: the [^\]0-9]*\]\.?$", text), (command, option.name, text)
        else:
            assert mentions == 1 and text.rstrip(".").endswith("]"), (command, option.name, text)


@pytest.mark.parametrize(("command", "new", "old", "dest"), [
    ("train-slice", "--loader-workers", "--workers", "workers"),
    ("train-denoiser", "--loader-workers", "--workers", "num_workers"),
    ("train-slice", "--image-size", "--size", "size"),
    ("residuals", "--grid-size", "--size", "size_xy"),
])
def test_one_name_per_meaning_and_old_names_still_work(command, new, old, dest, tmp_path):
    cmd = cli.get_command(CONTEXT, command)
    args = [str(tmp_path), "-o", str(tmp_path / "out")]
    args += ["--denoiser", str(tmp_path)] if command == "residuals" else []
    for flag in (new, old):
        ctx = cmd.make_context(command, [*args, flag, "3"])
        assert ctx.params[dest] == 3
    help_text = cmd.get_help(click.Context(cmd))
    assert new in help_text and f"{old} " not in help_text.replace(new, "")


@pytest.mark.parametrize("command", ["train-denoiser", "predict", "train-slice"])
def test_command_help_imports_no_torch(command):
    code = (
        "import sys\nfrom covidctnet.cli import cli\n"
        f"try:\n    cli([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'monai') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
