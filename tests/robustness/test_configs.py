"""Every command's ``--config`` is validated on load: an unknown key, a wrong type or an out-of-range value gives one
``Error:`` line naming the YAML file and the key, exit code 2, and nothing is written.

Each command is run with otherwise valid inputs made from the real scans, so the config is the only problem.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from robust_cases import (
    CONTROL,
    Sources,
    Workspace,
    assert_one_line_error,
    invoke,
    write_csv,
)

from covidctnet.models.registry import DEFAULT_SLICE_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reader_files(ws: Workspace, tmp: Path) -> tuple[Path, Path]:
    ids = ws.ids
    rows = [[ids["covid"], "covid"], [ids["cap"], "cap"], [ids["control"], "control"]]
    return write_csv(tmp / "reader1.csv", ["case_id", "label"], rows), write_csv(tmp / "truth.csv",
                                                                                ["case_id", "label"], rows)


def _reader_args(ws: Workspace, s: Sources, tmp: Path, out: Path) -> list[Any]:
    reader, truth = _reader_files(ws, tmp)
    return ["reader-study", "--model", ws.report, "--readers", reader, "--truth", truth, "-o", out]


# command -> the rest of a valid invocation (without --config), given the workspace, sources, tmp folder and output
CONFIG_COMMANDS: dict[str, Callable[[Workspace, Sources, Path, Path], list[Any]]] = {
    "preprocess": lambda ws, s, tmp, out: ["preprocess", s.nifti, "-o", out],
    "train-denoiser": lambda ws, s, tmp, out: ["train-denoiser", ws.pre, "-o", out, "--studies", CONTROL,
                                               "--device", "cpu"],
    "residuals": lambda ws, s, tmp, out: ["residuals", ws.pre, "-o", out, "--denoiser", ws.denoiser,
                                          "--device", "cpu"],
    "train-classifier": lambda ws, s, tmp, out: ["train-classifier", ws.residuals, "--labels", ws.labels, "-o", out,
                                                 "--device", "cpu"],
    "predict": lambda ws, s, tmp, out: ["predict", s.dicom["cap"], "--model", ws.model, "-o", out],
    "evaluate": lambda ws, s, tmp, out: ["evaluate", ws.report, "--labels", ws.labels, "-o", out],
    "reader-study": _reader_args,
    "train-slice": lambda ws, s, tmp, out: ["train-slice", s.ucsd, "-o", out, "--device", "cpu"],
    "cv-slice": lambda ws, s, tmp, out: ["cv-slice", s.ucsd, "-o", out, "--device", "cpu"],
    "slice-scores": lambda ws, s, tmp, out: ["slice-scores", s.dicom["cap"], "-o", out, "--denoiser", ws.denoiser],
    "validate-residuals": lambda ws, s, tmp, out: ["validate-residuals", tmp, "--labels", ws.labels, "-o", out],
    "pretrain-slice": lambda ws, s, tmp, out: ["pretrain-slice", s.ucsd, "-o", out, "--device", "cpu"],
    "train-lesion-model": lambda ws, s, tmp, out: ["train-lesion-model", s.dicom["control"], "-o", out,
                                                   "--device", "cpu"],
    # a copy: a valid config would rewrite the model directory's config.yaml
    "calibrate-cam": lambda ws, s, tmp, out: ["calibrate-cam", shutil.copytree(DEFAULT_SLICE_MODEL, tmp / "m"),
                                                         s.ucsd],
}

# (command, problem) -> (YAML text, regex the error must match; it names the key)
BAD_CONFIGS: dict[tuple[str, str], tuple[str, str]] = {
    ("preprocess", "unknown-key"): ("size_xyz: 64\n", r"unknown key\(s\) \['size_xyz'\]; valid keys: \[.*'size_xy'"),
    ("preprocess", "wrong-type"): ("size_xy: big\n", r"'size_xy' must be an integer, not 'big'"),
    ("preprocess", "out-of-range"): ("hu_max: -2000\n", r"'hu_max' must be greater than 'hu_min'"),
    ("train-denoiser", "unknown-key"): ("learning_rate: 0.1\n", r"unknown key\(s\) \['learning_rate'\]"),
    ("train-denoiser", "wrong-type"): ("epochs: ten\n", r"'epochs' must be an integer, not 'ten'"),
    ("train-denoiser", "out-of-range"): ("dropout: 1.5\n", r"'dropout' must be in \[0, 1\), not 1\.5"),
    ("residuals", "unknown-key"): ("dept: 50\n", r"unknown key\(s\) \['dept'\]"),
    ("residuals", "wrong-type"): ("depth: fifty\n", r"'depth' must be an integer, not 'fifty'"),
    ("residuals", "out-of-range"): ("size_xy: 0\n", r"'size_xy' must be an integer in \[1, 2048\], not 0"),
    ("train-classifier", "unknown-key"): ("epoch: 3\n", r"unknown key\(s\) \['epoch'\]"),
    ("train-classifier", "wrong-type"): ("lr: fast\n", r"'lr' must be a number, not 'fast'"),
    ("train-classifier", "out-of-range"): ("val_fraction: 1.5\n", r"'val_fraction' and 'test_fraction' must be"),
    ("slice-scores", "unknown-key"): ("statistc: p95\n", r"unknown key\(s\) \['statistc'\]"),
    ("slice-scores", "wrong-type"): ("min_lung_ml: lots\n", r"'min_lung_ml' must be a number, not 'lots'"),
    ("slice-scores", "out-of-range"): ("min_lung_ml: -1\n", r"'min_lung_ml' must be >= 0, not -1"),
    ("validate-residuals", "unknown-key"): ("lung_frac: 0.3\n", r"unknown key\(s\) \['lung_frac'\]"),
    ("validate-residuals", "wrong-type"): ("level: high\n", r"'level' must be a number, not 'high'"),
    ("validate-residuals", "out-of-range"): ("lung_fraction: 1.5\n", r"'lung_fraction' must be in \[0, 1\), not 1\.5"),
    ("predict", "unknown-key"): ("batchsize: 4\n", r"unknown key\(s\) \['batchsize'\]"),
    ("predict", "wrong-type"): ("save_residuals: maybe\n", r"'save_residuals' must be true or false, not 'maybe'"),
    ("predict", "out-of-range"): ("batch_size: 0\n", r"'batch_size' must be at least 1, not 0"),
    ("evaluate", "unknown-key"): ("ci: 0.9\n", r"unknown key\(s\) \['ci'\]"),
    ("evaluate", "wrong-type"): ("n_bootstrap: many\n", r"'n_bootstrap' must be an integer, not 'many'"),
    ("evaluate", "out-of-range"): ("ci_level: 1.5\n", r"'ci_level' must be in \[0\.5, 1\), not 1\.5"),
    ("reader-study", "unknown-key"): ("readers: 3\n", r"unknown key\(s\) \['readers'\]"),
    ("reader-study", "wrong-type"): ("seed: one\n", r"'seed' must be an integer, not 'one'"),
    ("reader-study", "out-of-range"): ("n_bootstrap: 3\n", r"'n_bootstrap' must be at least 10, not 3"),
    ("train-slice", "unknown-key"): ("sizes: 160\n", r"unknown key\(s\) \['sizes'\]"),
    ("train-slice", "wrong-type"): ("lung_mask: perhaps\n", r"'lung_mask' must be true or false, not 'perhaps'"),
    ("train-slice", "out-of-range"): ("threshold: 2\n", r"threshold must be in \(0, 1\), not 2"),
    ("cv-slice", "unknown-key"): ("fold: 3\n", r"unknown key\(s\) \['fold'\]"),
    ("cv-slice", "wrong-type"): ("epochs: many\n", r"'epochs' must be an integer, not 'many'"),
    ("cv-slice", "out-of-range"): ("threshold: 2\n", r"threshold must be in \(0, 1\), not 2"),
    ("pretrain-slice", "unknown-key"): ("temp: 0.1\n", r"unknown key\(s\) \['temp'\]"),
    ("pretrain-slice", "wrong-type"): ("temperature: hot\n", r"'temperature' must be a number, not 'hot'"),
    ("pretrain-slice", "out-of-range"): ("size: 8\n", r"size must be in \[32, 1024\] pixels, not 8"),
    ("train-lesion-model", "unknown-key"): ("lesions: 3\n", r"unknown key\(s\) \['lesions'\]"),
    ("train-lesion-model", "wrong-type"): ("synthesis: {max_lesions: many}\n",
                                           r"'max_lesions' must be an integer, not 'many'"),
    ("train-lesion-model", "out-of-range"): ("size_xy: 100\n", r"'size_xy' must be a multiple of 8"),
    ("calibrate-cam", "unknown-key"): ("percent: 99\n", r"unknown key\(s\) \['percent'\]"),
    ("calibrate-cam", "wrong-type"): ("percentile: high\n", r"'percentile' must be a number, not 'high'"),
    ("calibrate-cam", "out-of-range"): ("show_from: 2\n", r"show_from must be in \[0, 1\), not 2"),
}


def test_every_config_command_is_covered():
    """Every command that takes --config is here, with the three kinds of mistake (a new command cannot slip by)."""
    import click

    from covidctnet.cli import COMMANDS, cli

    ctx = click.Context(cli)
    with_config = {name for name in COMMANDS
                   if any("--config" in p.opts for p in cli.get_command(ctx, name).params)}
    assert with_config == set(CONFIG_COMMANDS)
    for command in CONFIG_COMMANDS:
        assert {p for c, p in BAD_CONFIGS if c == command} == {"unknown-key", "wrong-type", "out-of-range"}


@pytest.mark.parametrize("command, problem", list(BAD_CONFIGS), ids=[f"{c}-{p}" for c, p in BAD_CONFIGS])
def test_bad_config_is_refused_naming_file_and_key(command, problem, ws, sources, tmp_path):
    text, message = BAD_CONFIGS[command, problem]
    cfg = tmp_path / f"{command}.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    result = invoke(*CONFIG_COMMANDS[command](ws, sources, tmp_path, out), "--config", cfg)
    assert_one_line_error(result, cfg, message)
    assert not out.exists(), f"{out} was created"
