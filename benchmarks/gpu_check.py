"""Check every CUDA path of covidctnet on this machine's GPU against the CPU, in a few minutes.

There is no GPU on the project's own machines or in CI, so this is how a GPU owner verifies the CUDA code paths
(``make gpu-check``). Without CUDA it says so and exits 0. With CUDA, on the shared real scans
(``COVIDCTNET_TEST_DATA``, default ``../shared/data``), every step runs the command line as a user does
(``python -m covidctnet ...``), in a temporary folder:

1. ``preprocess`` the three 32-slice DICOM excerpts at 64 px (CPU: the input of everything below);
2. ``train-denoiser`` on the control study, 2 epochs of 3 steps, on the CPU and on CUDA with AMP: both finish with
   finite losses; the CUDA training throughput is printed;
3. ``residuals`` with the CPU-trained denoiser: CUDA fp32 and bf16 against CPU fp32;
4. ``train-classifier`` on the CPU residuals, on CUDA with AMP (finite losses); its model directory bundles the
   denoiser, so it is also the model of step 5;
5. ``predict`` on CUDA in fp32 and bf16 against CPU fp32: the three probabilities of every study;
6. a 1-process NCCL DistributedDataParallel run: ``torchrun --nproc_per_node 1 -m covidctnet train-denoiser``;
7. resume on CUDA: 1 epoch, then ``--resume`` to 2 epochs; the run ends at epoch 1 with both rows in metrics.csv.

Tolerances (stated, not tuned on a GPU): residual max |CUDA fp32 − CPU fp32| ≤ 1e-3 and bf16 ≤ 0.05 on the [0, 1]
scale; probabilities |Δp| ≤ 1e-3 (fp32) and ≤ 0.02 (bf16, the CPU bf16 gate of ``predict --precision bf16``).
Exit code 1 if any check fails, with a table of every check.

Usage::

    python benchmarks/gpu_check.py [--data ../shared/data] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("covid-P001", "cap-cap001", "control-normal001")
CONTROL = "control-normal001"
RESIDUAL_TOL = {"fp32": 1e-3, "bf16": 0.05}
PROB_TOL = {"fp32": 1e-3, "bf16": 0.02}


@dataclass(frozen=True)
class Check:
    """One comparison: its name, whether it passed, and the figure behind the verdict."""

    name: str
    passed: bool
    detail: str


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, tol: float) -> Check:
    """``max |candidate − reference| ≤ tol`` (shapes must agree; NaN fails)."""
    if reference.shape != candidate.shape:
        return Check(name, False, f"shape {candidate.shape} vs {reference.shape}")
    diff = float(np.max(np.abs(candidate.astype(np.float64) - reference.astype(np.float64)), initial=0.0))
    return Check(name, bool(diff <= tol), f"max |Δ| {diff:.2e} (tolerance {tol:g})")


def read_probabilities(report_csv: Path) -> dict[str, np.ndarray]:
    """``study_id -> (p_control, p_covid, p_cap)`` of the ok rows of a ``predict`` report."""
    with open(report_csv, newline="") as fh:
        return {r["study_id"]: np.array([float(r[f"p_{c}"]) for c in ("control", "covid", "cap")])
                for r in csv.DictReader(fh) if r["status"] == "ok"}


def compare_reports(name: str, reference: Path, candidate: Path, tol: float) -> Check:
    """Every study of ``reference`` predicted in ``candidate`` with probabilities within ``tol``."""
    ref, cand = read_probabilities(reference), read_probabilities(candidate)
    if not ref or set(ref) != set(cand):
        return Check(name, False, f"studies {sorted(cand)} vs {sorted(ref)}")
    worst = max(float(np.max(np.abs(cand[s] - ref[s]))) for s in ref)
    return Check(name, worst <= tol, f"max |Δp| {worst:.2e} over {len(ref)} studies (tolerance {tol:g})")


def training_check(name: str, metrics_csv: Path, epochs: int) -> Check:
    """The run wrote ``epochs`` rows with finite training losses; the detail gives its throughput."""
    if not metrics_csv.is_file():
        return Check(name, False, f"{metrics_csv} missing")
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["train_loss"]) for r in rows]
    speed = [float(r["train_samples_per_s"]) for r in rows if r.get("train_samples_per_s")]
    ok = len(rows) == epochs and all(np.isfinite(losses))
    return Check(name, ok, f"{len(rows)} epochs, losses {', '.join(f'{x:.4g}' for x in losses)}"
                           + (f"; {max(speed):.1f} samples/s" if speed else ""))


def summarize(checks: Sequence[Check]) -> tuple[str, int]:
    """A plain-text table of the checks and the exit code (1 if any failed, or if there is none)."""
    width = max((len(c.name) for c in checks), default=10)
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{c.name:<{width}}  {'ok' if c.passed else 'FAIL':<6}  {c.detail}" for c in checks]
    failed = [c for c in checks if not c.passed]
    lines.append(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return "\n".join(lines), int(bool(failed) or not checks)


CLI = (sys.executable, "-m", "covidctnet")


def _run(args: Sequence[object], log: Path, runner: Sequence[str] = CLI) -> float:
    """Run one command line as a user does; return its wall time in seconds (raises on a non-zero exit)."""
    cmd = [*runner, *(str(a) for a in args)]
    print("$", " ".join(["covidctnet", *cmd[len(CLI):]] if tuple(runner) == CLI else cmd), flush=True)
    t = time.perf_counter()
    with open(log, "a") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "COVIDCTNET_NO_PROGRESS": "1"})
    if done.returncode:
        raise RuntimeError(f"exit code {done.returncode}: {' '.join(cmd)} (log: {log})")
    return time.perf_counter() - t


def _residuals(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in sorted(folder.glob("*_residual.nii.gz"))}


class _Steps:
    """Runs the steps; a step that crashes is a failed check and the others still run."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.checks: list[Check] = []

    def run(self, name: str, *commands: Sequence[object], runner: Sequence[str] = CLI) -> bool:
        try:
            for args in commands:
                _run(args, self.log, runner)
        except Exception as err:  # a crash on the GPU is what this script exists to find: report it, go on
            self.checks.append(Check(name, False, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
            return False
        return True


def gpu_checks(data: Path, work: Path, device: str = "cuda") -> list[Check]:
    """Steps 1–7 of the module docstring in ``work``, comparing ``device`` with the CPU."""
    steps = _Steps(work / "commands.log")
    checks = steps.checks
    pre = work / "pre"
    scans = [data / "ct-dicom" / s for s in STUDIES]
    den_cfg = work / "den.yaml"
    den_cfg.write_text("features: 8\nepochs: 2\nsteps_per_epoch: 3\nbatch_size: 4\nslices_per_study: 24\n"
                       "sample_png: false\n")
    cls_cfg = work / "cls.yaml"
    cls_cfg.write_text("depth: 50\nsize_xy: 64\nepochs: 2\nbatch_size: 2\nval_fraction: 0.0\naugment: false\n")
    labels = work / "labels.csv"
    labels.write_text("study_id,label\ncovid-P001,covid\ncap-cap001,cap\ncontrol-normal001,control\n")
    den_args = ["--config", den_cfg, "--studies", CONTROL]

    steps.run("preprocess (cpu)", ["preprocess", *scans, "-o", pre, "--size", 64])
    for dev in dict.fromkeys(("cpu", device)):
        if steps.run(f"train-denoiser {dev}", ["train-denoiser", pre, "-o", work / f"den_{dev}", *den_args,
                                               "--device", dev]):
            checks.append(training_check(f"train-denoiser {dev}", work / f"den_{dev}" / "metrics.csv", 2))
    variants = (("cpu", "fp32"), (device, "fp32"), (device, "bf16"))
    for dev, precision in variants:
        steps.run(f"residuals {dev} {precision}", ["residuals", pre, "-o", work / f"res_{dev}_{precision}",
                                                   "--denoiser", work / "den_cpu", "--depth", 50, "--grid-size", 64,
                                                   "--device", dev, "--precision", precision])
    reference = _residuals(work / "res_cpu_fp32")
    for precision in ("fp32", "bf16"):
        candidate = _residuals(work / f"res_{device}_{precision}")
        if not reference or set(candidate) != set(reference):
            checks.append(Check(f"residuals {device} {precision}", False,
                                f"{sorted(candidate)} vs {sorted(reference)}"))
            continue
        checks += [compare_arrays(f"residual {device} {precision} vs cpu fp32: {name}", reference[name],
                                  candidate[name], RESIDUAL_TOL[precision]) for name in sorted(reference)]
    cls = work / f"cls_{device}"
    if steps.run(f"train-classifier {device}", ["train-classifier", work / "res_cpu_fp32", "--labels", labels, "-o",
                                                cls, "--config", cls_cfg, "--device", device]):
        checks.append(training_check(f"train-classifier {device}", cls / "metrics.csv", 2))
    for dev, precision in variants:
        steps.run(f"predict {dev} {precision}", ["predict", *scans, "--model", cls / "model", "-o",
                                                 work / f"pred_{dev}_{precision}", "--device", dev,
                                                 "--precision", precision])
    for precision in ("fp32", "bf16"):
        ref_csv, cand_csv = work / "pred_cpu_fp32" / "report.csv", work / f"pred_{device}_{precision}" / "report.csv"
        if ref_csv.is_file() and cand_csv.is_file():
            checks.append(compare_reports(f"predict {device} {precision} vs cpu fp32", ref_csv, cand_csv,
                                          PROB_TOL[precision]))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if steps.run(f"DDP {backend}, 1 process", ["--standalone", "--nproc_per_node", 1, "-m", "covidctnet",
                                               "train-denoiser", pre, "-o", work / "den_ddp", *den_args, "--device",
                                               device], runner=(torchrun,)):
        checks.append(training_check(f"DDP {backend}, 1 process", work / "den_ddp" / "metrics.csv", 2))
    cut = work / "den_resume"
    if steps.run(f"resume {device}", ["train-denoiser", pre, "-o", cut, *den_args, "--device", device, "--epochs", 1],
                 ["train-denoiser", pre, "-o", cut, "--studies", CONTROL, "--device", device, "--epochs", 2,
                  "--resume"]):
        checks.append(training_check(f"resume {device} (1 + 1 epochs)", cut / "metrics.csv", 2))
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("COVIDCTNET_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--keep", type=Path, default=None,
                        help="Work in this folder and keep it (default: a temp dir).")
    parser.add_argument("--device", default="cuda", help="Device compared with the CPU (cpu: a dry run of the script).")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch sees none), so there is nothing to check; run it on a "
              "machine with an NVIDIA GPU and a CUDA build of torch.")
        return 0
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU (dry run)"
    print(f"gpu-check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    t = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        checks = gpu_checks(args.data, args.keep, args.device)
    else:
        with tempfile.TemporaryDirectory(prefix="covidctnet-gpu-check-") as tmp:
            checks = gpu_checks(args.data, Path(tmp), args.device)
    table, code = summarize(checks)
    print(table)
    print(f"gpu-check: {time.perf_counter() - t:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
