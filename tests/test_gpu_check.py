"""benchmarks/gpu_check.py: its comparisons fail on a mismatch, and without CUDA it says so and exits 0."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402  (a script, not a package)


def test_compare_arrays():
    a = np.zeros((4, 4, 2), np.float32)
    assert gpu_check.compare_arrays("x", a, a + 5e-4, 1e-3).passed
    assert not gpu_check.compare_arrays("x", a, a + 2e-3, 1e-3).passed
    assert not gpu_check.compare_arrays("x", a, np.full_like(a, np.nan), 1e-3).passed
    assert not gpu_check.compare_arrays("x", a, a[:3], 1e-3).passed


def _report(path: Path, rows: list[tuple[str, float, float, float, str]]) -> Path:
    lines = ["study_id,p_control,p_covid,p_cap,predicted,status,error"]
    lines += [f"{s},{a},{b},{c},covid,{st}," for s, a, b, c, st in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compare_reports(tmp_path):
    ref = _report(tmp_path / "ref.csv", [("a", 0.1, 0.8, 0.1, "ok"), ("b", 0.5, 0.25, 0.25, "ok")])
    near = _report(tmp_path / "near.csv", [("a", 0.1005, 0.7995, 0.1, "ok"), ("b", 0.5, 0.25, 0.25, "ok")])
    far = _report(tmp_path / "far.csv", [("a", 0.2, 0.7, 0.1, "ok"), ("b", 0.5, 0.25, 0.25, "ok")])
    lost = _report(tmp_path / "lost.csv", [("a", 0.1, 0.8, 0.1, "ok"), ("b", 0.5, 0.25, 0.25, "error")])
    assert gpu_check.compare_reports("p", ref, near, 1e-3).passed
    assert not gpu_check.compare_reports("p", ref, far, 1e-3).passed
    assert not gpu_check.compare_reports("p", ref, lost, 1e-3).passed  # a study failed on the GPU


def test_training_check(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("epoch,train_loss,train_samples_per_s\n0,0.7,12.5\n1,0.6,13.0\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,train_loss,train_samples_per_s\n0,0.7,12.5\n1,nan,13.0\n")
    assert gpu_check.training_check("t", good, 2).passed and "13.0 samples/s" in gpu_check.training_check(
        "t", good, 2).detail
    assert not gpu_check.training_check("t", bad, 2).passed
    assert not gpu_check.training_check("t", good, 3).passed
    assert not gpu_check.training_check("t", tmp_path / "missing.csv", 2).passed


def test_summary_exit_code():
    ok, fail = gpu_check.Check("a", True, ""), gpu_check.Check("b", False, "Δ 1")
    assert gpu_check.summarize([ok])[1] == 0
    text, code = gpu_check.summarize([ok, fail])
    assert code == 1 and "FAIL" in text and "1 passed, 1 failed" in text
    assert gpu_check.summarize([])[1] == 1  # no check at all is not a pass


def test_without_cuda_says_so_and_exits_0(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run `make gpu-check` instead")
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
