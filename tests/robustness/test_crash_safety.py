"""A training run killed with SIGKILL resumes to exactly the weights of an uninterrupted run.

`covidctnet train-denoiser` runs in a real process on the real control series (tiny config, CPU, fixed seed) and is
killed as soon as its first checkpoint exists; `--resume` then finishes it. The final weights, the exported model
weights and the metrics must equal those of a run that was never interrupted. (The same kill-and-resume proof for
`covidctnet preprocess`, byte for byte, is ``tests/cli/test_cli.py::test_sigkill_then_resume_equals_uninterrupted``.)
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from robust_cases import (
    CONTROL,
    invoke_ok,
)

from covidctnet.core.checkpoint import load_checkpoint
from covidctnet.training.trainer import TIMING_COLUMNS

EPOCHS = 3
# Small enough for seconds per epoch on a busy CPU, but the whole real recipe: BCE, Adam, half-noised batches,
# validation, sample PNGs, checkpoints every epoch.
TINY = {"features": 4, "batch_size": 4, "steps_per_epoch": 3, "val_batch_size": 16, "slices_per_study": 24,
        "seed": 7, "epochs": EPOCHS}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _metrics(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock columns."""
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
                for row in csv.DictReader(fh)]


def test_sigkill_then_resume_equals_uninterrupted(ws, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    args = ["train-denoiser", str(ws.pre), "--config", str(cfg), "--studies", CONTROL, "--device", "cpu"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    invoke_ok(*args, "-o", full)

    # the same command in its own process, killed once the first epoch's checkpoint is on disk
    exe = str(Path(sys.executable).with_name("covidctnet"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COVIDCTNET_NO_PROGRESS": "1"}  # one thread, as in-process
    proc = subprocess.Popen([exe, *args, "-o", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    last = cut / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not last.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr.decode()[-2000:]}"
    killed_at = load_checkpoint(last)["epoch"]
    assert killed_at < EPOCHS - 1 and not (cut / "model").exists()  # really interrupted mid-run
    # Where the kill lands is timing; a kill inside a write leaves the writer's hidden temp beside the intact file
    # (utils.atomic_path, model_dir.save_model_dir). Add those leftovers, named as the writers name them.
    (cut / "checkpoints" / ".last.pt.k1ll3d.tmp.pt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (cut / ".metrics.csv.k1ll3d.tmp.csv").write_text("epoch,train_loss\n0,")
    (cut / ".model.k1ll3d.tmp").mkdir()
    (cut / ".model.k1ll3d.tmp" / "denoiser.safetensors").write_bytes(b"partial")

    # resume: the run folder's own config.yaml and data.yaml give the settings and studies
    invoke_ok("train-denoiser", ws.pre, "-o", cut, "--resume", "--device", "cpu")
    assert load_checkpoint(last)["epoch"] == EPOCHS - 1
    a, b = load_checkpoint(full / "checkpoints" / "last.pt")["model"], load_checkpoint(last)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = [(run / "model" / "denoiser.safetensors").read_bytes() for run in (full, cut)]
    assert exported[0] == exported[1]
    assert _metrics(full) == _metrics(cut) and len(_metrics(cut)) == EPOCHS
    assert sorted(p.name for p in (cut / "samples").iterdir()) == [f"epoch_{e:03d}.png" for e in range(EPOCHS)]
    assert not list(cut.rglob(".*.tmp*"))  # the resume removed what the killed writes left
