"""Benchmark: MosMed-size training data — peak memory, data waiting and disk use of train-denoiser / train-classifier.

MosMedData has 1,110 studies, 254 of them normal. Datasets of that size are made here from the real shared CT: the
four full series of ``ct-dicom-full`` are preprocessed once (240×240, 1 mm), and each synthetic study is one of them
cut or padded to 300 slices, shifted in-plane by up to ±12 px, flipped left-right at random and re-noised (Gaussian,
σ = 0.01 of the [0, 1] range), so every study is CT-like and different. Residual volumes (50×240×240) are a high-pass of
the same volumes (volume − Gaussian blur, σ 2 px), a stand-in with the residuals' size and signed values.

Each command runs as a user runs it (``python -m covidctnet …``, a fresh process) for a fixed number of optimiser steps
with ``--loader-workers 2``; this script samples the memory of the process and its loader workers every second
(RSS of the training process; PSS summed over the process tree, which counts pages shared by the forked workers once)
and reads ``data_wait_frac`` (share of the epoch spent waiting for the next batch) from ``metrics.csv``. The first
run on a folder also decodes the ``.npy`` caches; the second, timed separately, reads them.

Usage::

    python benchmarks/scale.py --work /big/disk/scale [--studies 20 100 250] [--residuals 1110] [--steps 30]
                               [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "## MosMed-size training data"
SHARED = Path(os.environ.get("COVIDCTNET_TEST_DATA", REPO.parent / "shared" / "data"))
DEPTH, SIZE = 300, 240


def _base_volumes(work: Path) -> list[np.ndarray]:
    """The four full shared series, preprocessed at 240×240 (1 mm), as (X, Y, Z) float32 in [0, 1]."""
    out = work / "base"
    if not (out / "manifest.csv").is_file():
        subprocess.run([sys.executable, "-m", "covidctnet", "preprocess", str(SHARED / "ct-dicom-full"), "-o", str(out),
                        "--size", str(SIZE), "-q"], check=True)
    from covidctnet.io.volume import read_nifti

    return [read_nifti(p).array for p in sorted(out.glob("*.nii.gz"))]


def _variant(base: np.ndarray, rng: np.random.Generator, depth: int) -> np.ndarray:
    z = base.shape[2]
    if z >= depth:
        start = int(rng.integers(0, z - depth + 1))
        vol = base[:, :, start : start + depth]
    else:
        vol = np.pad(base, ((0, 0), (0, 0), (0, depth - z)), mode="reflect")
    dx, dy = (int(v) for v in rng.integers(-12, 13, size=2))
    vol = np.roll(vol, (dx, dy), axis=(0, 1))
    if rng.random() < 0.5:
        vol = vol[::-1]
    vol = vol + rng.normal(0.0, 0.01, size=vol.shape).astype(np.float32)
    return np.clip(vol, 0.0, 1.0).astype(np.float32)


def _write(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), np.eye(4)), str(path))


def make_controls(work: Path, n: int, bases: list[np.ndarray]) -> Path:
    """``work/controls`` with ``n`` control studies (added to what is there) and its labels CSV."""
    folder = work / "controls"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocess.yaml").write_text(f"size_xy: {SIZE}\nprofile: default\nhu_min: -1000\nhu_max: 400\n")
    for i in range(n):
        path = folder / f"ctrl{i:04d}.nii.gz"
        if not path.exists():
            _write(path, _variant(bases[i % len(bases)], np.random.default_rng(i), DEPTH))
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "source", "label", "status", "error", "output", "sha256"])
        for i in range(n):
            w.writerow([f"ctrl{i:04d}", f"ctrl{i:04d}", "control", "ok", "", f"ctrl{i:04d}.nii.gz", ""])
    return folder


def make_residuals(work: Path, n: int, bases: list[np.ndarray]) -> Path:
    from scipy.ndimage import gaussian_filter, zoom

    folder = work / "residuals"
    folder.mkdir(parents=True, exist_ok=True)
    highpass = []
    for b in bases:
        small = zoom(b, (1, 1, 50 / b.shape[2]), order=1)
        highpass.append((small - gaussian_filter(small, (2, 2, 0))).astype(np.float32))
    classes = ["control", "covid", "cap"]
    rows = []
    for i in range(n):
        path = folder / f"res{i:04d}_residual.nii.gz"
        if not path.exists():
            rng = np.random.default_rng(10_000 + i)
            vol = np.roll(highpass[i % len(highpass)], tuple(int(v) for v in rng.integers(-12, 13, size=2)), (0, 1))
            _write(path, vol + rng.normal(0.0, 0.005, size=vol.shape).astype(np.float32))
        rows.append([f"res{i:04d}", classes[i % 3]])
    with open(folder / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "label"])
        w.writerows(rows)
    with open(folder / "manifest.csv", "w", newline="") as fh:  # as `covidctnet residuals` writes it
        w = csv.writer(fh)
        w.writerow(["study_id", "source", "label", "status", "error", "output", "sha256"])
        w.writerows([sid, sid, label, "ok", "", f"{sid}_residual.nii.gz", ""] for sid, label in rows)
    return folder


def _disk_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


class _Memory:
    """Peak RSS of a process and peak PSS summed over it and its children, sampled every second."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.rss = self.pss_tree = 0
        self.n_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.rss = max(self.rss, self.proc.memory_info().rss)
                pss = 0
                for p in procs:
                    try:
                        pss += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                self.pss_tree = max(self.pss_tree, pss)
                self.n_procs = max(self.n_procs, len(procs))
            except psutil.NoSuchProcess:
                break
            time.sleep(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(cmd: list[str]) -> dict:
    """Run one command as a fresh process; wall time and memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mem = _Memory(proc.pid)
    _, err = proc.communicate()
    mem.stop()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "rss_gb": mem.rss / 1e9, "pss_tree_gb": mem.pss_tree / 1e9,
            "procs": mem.n_procs}


def _metrics(run_dir: Path, batch_size: int) -> dict:
    """Training figures of the run's one (partial) epoch: steps, seconds per optimiser step, share waiting for data."""
    last = list(csv.DictReader((run_dir / "metrics.csv").open()))[-1]
    return {"steps": int(last["step"]), "data_wait_frac": float(last["data_wait_frac"]),
            "s_per_step": batch_size / float(last["train_samples_per_s"])}


def _first_and_cached(run_base: Path, command: list[str], batch_size: int) -> dict:
    """``command`` (a ``covidctnet`` training command without ``-o``) run twice: decoding the caches, then reading."""
    out = {}
    for phase in ("first", "cached"):
        run_dir = run_base.with_name(f"{run_base.name}_{phase}")
        shutil.rmtree(run_dir, ignore_errors=True)
        out[phase] = {**run([sys.executable, "-m", "covidctnet", *command, "-o", str(run_dir)]),
                      **_metrics(run_dir, batch_size)}
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _common(steps: int, workers: int) -> list[str]:
    return ["--max-steps", str(steps), "--loader-workers", str(workers), "--device", "cpu", "-q"]


def bench_denoiser(work: Path, n: int, steps: int, workers: int) -> dict:
    data = work / "controls"
    cfg = work / "denoiser_bench.yaml"
    cfg.write_text("sample_png: false\nval_max_slices: 20\nval_fraction: 0.05\n")
    ids = [f"ctrl{i:04d}" for i in range(n)]
    out = _first_and_cached(work / f"den_{n}", ["train-denoiser", str(data), "--config", str(cfg), "--studies",
                                                 ",".join(ids), *_common(steps, workers)], 5)
    out["disk_nii_mb"] = _disk_mb([data / f"{s}.nii.gz" for s in ids]) / n
    out["disk_cache_mb"] = _disk_mb([data / "cache" / f"{s}.npy" for s in ids]) / n
    return out


def bench_classifier(work: Path, steps: int, workers: int) -> dict:
    data = work / "residuals"
    cfg = work / "classifier_bench.yaml"
    cfg.write_text("val_fraction: 0.02\naugment: true\npatience: null\n")
    out = _first_and_cached(work / "cls", ["train-classifier", str(data), "--labels", str(data / "labels.csv"),
                                           "--config", str(cfg), *_common(steps, workers)], 4)
    files = sorted(data.glob("*_residual.nii.gz"))
    out["n"] = len(files)
    out["disk_nii_mb"] = _disk_mb(files) / len(files)
    out["disk_cache_mb"] = _disk_mb(sorted((data / "cache").glob("*.npy"))) / len(files)
    return out


def _row(name: str, r: dict) -> str:
    f, c = r["first"], r["cached"]
    return (f"| {name} | {f['wall_s']:.0f} | {c['wall_s']:.0f} | {c['s_per_step']:.2f} | {100 * c['data_wait_frac']:.1f}% "
            f"| {max(f['rss_gb'], c['rss_gb']):.2f} | {max(f['pss_tree_gb'], c['pss_tree_gb']):.2f} "
            f"| {r['disk_nii_mb']:.0f} + {r['disk_cache_mb']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the synthetic data (~110 MB per control "
                        "study, ~20 MB per residual volume; default: a temporary folder, removed at the end)")
    parser.add_argument("--studies", type=int, nargs="*", default=[20, 100, 250])
    parser.add_argument("--residuals", type=int, default=1110)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    work = args.work or Path(tempfile.mkdtemp(prefix="covidctnet-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _bench(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, work: Path) -> None:
    from _docs import cpu_model, replace_section

    load = os.getloadavg()
    t0 = time.perf_counter()
    bases = _base_volumes(work)
    print(f"{len(bases)} base volumes, shapes {[b.shape for b in bases]}", flush=True)
    den = {}
    for n in sorted(args.studies):
        t = time.perf_counter()
        make_controls(work, n, bases)
        print(f"{n} control studies written ({time.perf_counter() - t:.0f} s)", flush=True)
        den[n] = bench_denoiser(work, n, args.steps, args.workers)
        print(f"train-denoiser, {n} studies: {den[n]}", flush=True)
    cls = None
    if args.residuals:
        del_controls = work / "controls"
        shutil.rmtree(del_controls, ignore_errors=True)  # disk: the residual set needs the space
        t = time.perf_counter()
        make_residuals(work, args.residuals, bases)
        print(f"{args.residuals} residual volumes written ({time.perf_counter() - t:.0f} s)", flush=True)
        cls = bench_classifier(work, args.steps, args.workers)
        print(f"train-classifier, {args.residuals} volumes: {cls}", flush=True)
    end_load = os.getloadavg()
    header = ("| run | wall, first (s) | wall, cached (s) | s / step | waiting for data | peak RSS (GB) | "
              "peak PSS, process + workers (GB) | disk per study: .nii.gz + .npy cache (MB) |\n"
              "|---|---|---|---|---|---|---|---|")
    rows = [_row(f"train-denoiser, {n} control studies × {DEPTH} slices", r) for n, r in den.items()]
    if cls:
        rows.append(_row(f"train-classifier, {cls['n']} residual volumes 50×240×240", cls))
    rss = [max(r["first"]["rss_gb"], r["cached"]["rss_gb"]) for r in den.values()]
    flat = f"{100 * (max(rss) / min(rss) - 1):.1f}%" if rss else "n/a"
    shown = os.path.relpath(work)  # the document must not name this machine's folders
    text = f"""{SECTION}

`python benchmarks/scale.py --work {shown} --studies {' '.join(map(str, args.studies))} --residuals {args.residuals} \
--steps {args.steps} --workers {args.workers}` on {cpu_model()} ({os.cpu_count()} cores), load average
{load[0]:.1f} at the start and {end_load[0]:.1f} at the end ({(time.perf_counter() - t0) / 60:.0f} min in all).
Each command ran as a fresh process (`python -m covidctnet train-… --max-steps {args.steps} --loader-workers
{args.workers} --device cpu`), twice: *first* decodes the `.npy` caches, *cached* reads them. Synthetic studies made
from the four full shared series (see the script's docstring). Steps: batch 5 slices of 240×240 (denoiser, BCDU-Net
width 32), batch 4 volumes (classifier, official CNN, with augmentation).

{header}
{chr(10).join(rows)}

Peak RSS of the training process varies by {flat} from the smallest to the largest control set (target: flat within
10% and at most 3 GB): it is the network's training memory at 240×240, not data (holding the slices in memory would
add 69 MB per control study). "Waiting for data" is the share of the cached run's training time spent in
`next(loader)` (target ≤ 10% with 2 loader workers). The classifier's `.npy` caches are built lazily, only for the
volumes a run reads, hence its small cache per study here; the *first* runs' extra time is decoding `.nii.gz` into
caches.
"""
    print(text)
    if args.write_docs:
        replace_section(args.write_docs, SECTION, text)


if __name__ == "__main__":
    main()
