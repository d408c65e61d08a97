"""What works the same wherever it is typed: global options after the command, `python -m covidctnet`, `gpu`."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from click.testing import CliRunner

from covidctnet.cli import cli
from covidctnet.core.device import resolve_device
from covidctnet.core.errors import ConfigError


@pytest.fixture
def restore_log_level():
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)  # the commands below change the root logger for the whole test session


def test_global_options_after_the_command(tmp_path, restore_log_level):
    missing = tmp_path / "nothing"
    before = CliRunner().invoke(cli, ["--debug", "preprocess", str(missing), "-o", str(tmp_path / "a")])
    after = CliRunner().invoke(cli, ["preprocess", str(missing), "-o", str(tmp_path / "b"), "--debug"])
    plain = CliRunner().invoke(cli, ["preprocess", str(missing), "-o", str(tmp_path / "c")])
    # --debug lets the library error through with its traceback instead of the one-line message
    assert type(before.exception).__name__ == type(after.exception).__name__ == "InputError"
    assert plain.exit_code == 2 and plain.output.strip() == f"Error: {missing}: no such file or folder"
    CliRunner().invoke(cli, ["defaults", "predict", "-q"])
    assert logging.getLogger().level == logging.WARNING
    CliRunner().invoke(cli, ["defaults", "predict", "-vv"])
    assert logging.getLogger().level == logging.DEBUG
    assert "--quiet" not in CliRunner().invoke(cli, ["defaults", "--help"]).output  # hidden: the group's help has it


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "covidctnet", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("covidctnet ")


def test_gpu_is_cuda():
    import torch

    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("gpu") == torch.device("cuda") and resolve_device("gpu:0") == torch.device("cuda:0")
    else:  # the message keeps the user's word
        with pytest.raises(ConfigError, match="--device gpu: CUDA is not available"):
            resolve_device("gpu")
    with pytest.raises(ConfigError, match="--device tpu: not a device name"):
        resolve_device("tpu")


def test_predict_defaults_to_the_bundled_model_and_says_it_is_a_demonstration(tmp_path):
    from covidctnet.inference.predict import DEMO_SCAN
    from covidctnet.models.registry import DEMO_MODEL

    result = CliRunner().invoke(cli, ["predict", str(DEMO_SCAN), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "demonstration" in line]
    assert len(notes) == 1 and "not diagnostic" in notes[0]
    import csv

    from covidctnet.core.model_dir import load_model_dir

    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [r["model"] for r in rows] == [load_model_dir(DEMO_MODEL).name]
