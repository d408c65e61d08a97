"""configs/*.yaml are generated from the config dataclasses: the files, the dataclasses and `covidctnet defaults`
say the same thing, so a default is written in one place only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from covidctnet.cli import cli
from covidctnet.cli.defaults import CONFIG_FILES, config_text
from covidctnet.cli.options import resolve_ref
from covidctnet.core.config import config_yaml, load_config
from covidctnet.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_config_file_is_generated():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(CONFIG_FILES)


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_config_file_equals_generated_text(name):
    assert (CONFIGS / name).read_text() == config_text(name), (
        f"configs/{name} is out of date: regenerate with `covidctnet defaults {name.removesuffix('.yaml')} "
        f"> configs/{name}`")


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_config_file_loads_to_the_dataclass_defaults(name):
    cls_ref, preset_ref = CONFIG_FILES[name]
    cls = resolve_ref(cls_ref)
    preset = resolve_ref(preset_ref) if preset_ref else None
    assert load_config(cls, CONFIGS / name) == load_config(cls, None, defaults=preset)


def test_defaults_command_prints_the_file():
    result = CliRunner().invoke(cli, ["defaults", "denoiser"])
    assert result.exit_code == 0 and result.output == (CONFIGS / "denoiser.yaml").read_text()


def test_undocumented_field_is_refused():
    @dataclass(frozen=True)
    class Half:
        """Settings.

        Attributes:
            a: documented.
        """

        a: int = 1
        b: int = 2

    with pytest.raises(ConfigError, match=r"\['b'\] missing from the docstring"):
        config_yaml(Half)


def test_generated_text_takes_values_and_comments_from_the_dataclass():
    @dataclass(frozen=True)
    class Whole:
        """Settings of ``covidctnet x``.

        Attributes:
            a, b: two numbers (``None``: unset; see :class:`~covidctnet.core.config.Thing`).
        """

        a: int | None = None
        b: tuple[int, int] = (1, 2)

    assert config_yaml(Whole, {"b": [3, 4]}) == (
        "# Settings of covidctnet x.\n"
        "# Generated from the config dataclass (covidctnet defaults); a YAML passed with --config overrides keys.\n"
        "\n"
        "# a, b: two numbers (null: unset; see Thing).\n"
        "a: null\n"
        "b: [3, 4]\n"
    )
