"""Progress lines in the log when stderr is not a terminal: counts, percentages, ETAs, spacing, nesting."""

from __future__ import annotations

import functools
import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from covidctnet.core import progress as progress_mod
from covidctnet.core.progress import format_duration, progress, progress_task
from covidctnet.inference.residuals import compute_residual
from covidctnet.io.batch import Study, run_batch
from covidctnet.models.bcdunet import BCDUNet


@pytest.fixture
def log_mode(monkeypatch, caplog):
    """stderr is a file (not a terminal), progress allowed, INFO lines of covidctnet.progress captured."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("COVIDCTNET_NO_PROGRESS", raising=False)
    caplog.set_level(logging.INFO, logger="covidctnet.progress")
    return caplog


@pytest.fixture
def clock(monkeypatch):
    """A fake monotonic clock for the progress module: ``clock.now`` seconds, moved by the test."""

    class Clock:
        now = 1000.0

    c = Clock()
    monkeypatch.setattr(progress_mod, "_clock", lambda: c.now)
    return c


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "covidctnet.progress"]


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 45, 65, 3599, 3600 * 2 + 7 * 60)] == [
        "0 s", "45 s", "1 min 05 s", "59 min 59 s", "2 h 07 min"]


def test_outer_loop_logs_each_tenth_with_eta_but_not_faster_than_the_minimum_gap(log_mode, clock):
    for _ in progress(range(100), desc="predict", unit="studies"):
        clock.now += 1.0  # 1 s per study: a 10% step every 10 s, more than the 5 s minimum gap
    lines = _lines(log_mode)
    assert len(lines) == 10
    assert lines[0] == "predict: 10/100 studies (10%), 10 s elapsed, ETA 1 min 30 s"
    assert lines[-1] == "predict: 100/100 studies (100%), 1 min 40 s elapsed"
    log_mode.clear()
    for _ in progress(range(100), desc="fast"):
        clock.now += 0.125  # a 10% step every 1.25 s: lines at least 5 s apart
    # ... and the last line comes anyway, so that the log shows the end
    assert [line.split(" (")[0] for line in _lines(log_mode)] == [f"fast: {k}/100 items" for k in (40, 80, 100)]


def test_slow_steps_log_on_the_timer_and_a_nested_loop_only_on_the_timer(log_mode, clock):
    with progress_task(2, "batch", "studies") as outer:
        with progress_task(300, "denoise s1", "slices") as inner:
            for _ in range(30):  # 10 slices per 2 s: 60 s for the study, a 10% step every 6 s
                clock.now += 2.0
                inner.advance(10)
        outer.advance()
    lines = _lines(log_mode)
    # the nested loop ignores its 10% steps (10 lines a study would flood the log): one line per 30 s
    assert lines == ["denoise s1: 150/300 slices (50%), 30 s elapsed, ETA 30 s",
                     "denoise s1: 300/300 slices (100%), 1 min 00 s elapsed",
                     "batch: 1/2 studies (50%), 1 min 00 s elapsed, ETA 1 min 00 s"]


def test_disabled_by_environment_or_argument(log_mode, monkeypatch):
    items = [1, 2, 3]
    assert progress(items, enabled=False) is items
    monkeypatch.setenv("COVIDCTNET_NO_PROGRESS", "1")
    assert progress(items) is items
    with progress_task(3, "x") as task:
        task.advance(3)
    assert _lines(log_mode) == []


def test_a_terminal_gets_one_live_display_with_a_bar_per_running_loop(monkeypatch):
    monkeypatch.delenv("COVIDCTNET_NO_PROGRESS", raising=False)
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress_mod, "Console", functools.partial(Console, force_terminal=True, width=100))
    handler = logging.StreamHandler(terminal)  # as the CLI's logging.basicConfig(stream=sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with progress_task(2, "batch", "studies", enabled=True) as outer:
            display = progress_mod._display
            with progress_task(8, "denoise s1", "slices", enabled=True) as inner:
                inner.advance(8)
                assert progress_mod._display is display and len(display.tasks) == 2
            assert [t.description for t in display.tasks] == ["batch"]  # the inner bar is gone with its loop
            # a log line goes through the display (printed above the bars), not into the middle of them
            assert handler.stream is not terminal
            root.warning("s1 done")
            outer.advance()
    finally:
        root.removeHandler(handler)
    assert progress_mod._display is None and progress_mod._open == [] and handler.stream is terminal
    assert "s1 done" in terminal.getvalue() and "1/2 studies" in terminal.getvalue()


def _denoise_study(study: Study, out_dir: Path) -> dict[str, str]:
    torch.manual_seed(0)
    volume = np.random.default_rng(0).random((16, 16, 12), dtype=np.float32)
    compute_residual(volume, BCDUNet(features=4), depth=4, size=16, batch_size=4, source=str(study.path))
    return {}


@pytest.mark.usefixtures("one_torch_thread")
def test_a_batch_of_denoised_studies_logs_study_and_slice_counts(log_mode, monkeypatch, tmp_path):
    """What a log file of `covidctnet predict ... 2> log` shows: per-slice lines inside each study, batch ETA."""
    monkeypatch.setattr(progress_mod, "LOG_MIN_GAP_S", 0.0)
    monkeypatch.setattr(progress_mod, "LOG_MAX_GAP_S", 0.0)  # a line at every step: the test takes a second
    studies = [Study(f"s{i}", tmp_path / f"s{i}.nii.gz", f"s{i}.nii.gz") for i in (1, 2)]
    summary = run_batch(studies, tmp_path / "out", _denoise_study, manifest_name=None, desc="residuals")
    assert summary.n_ok == 2
    lines = _lines(log_mode)
    slices = [line for line in lines if line.startswith("denoise s1.nii.gz: ")]
    assert [line.split(" (")[0] for line in slices] == [f"denoise s1.nii.gz: {k}/12 slices" for k in (4, 8, 12)]
    batch = [line for line in lines if line.startswith("residuals: ")]
    assert len(batch) == 2 and batch[0].startswith("residuals: 1/2 studies (50%), ") and "ETA" in batch[0]
    assert batch[1].startswith("residuals: 2/2 studies (100%), ")
    assert lines.index(batch[0]) > lines.index(slices[-1])  # study 1's slices, then the batch count
