"""Benchmark: `covidctnet predict` latency per scan on CPU, split into read, preprocess, denoise and classify, with
the peak RSS of the process.

Latency does not depend on the weights' values, so by default the benchmark builds a model directory with randomly
initialised networks of the chosen size (official BCDU-Net width 32 at 240×240, CovidCTNet 3D CNN at 50×240×240);
``--model`` times a real model directory instead. Each scan runs in its own subprocess (peak RSS per scan).

``--backends torch onnx`` (the default) times both backends: the model directory is exported once with
``covidctnet.onnx_export.export_onnx`` (which checks the export against PyTorch) and every scan is predicted with
each. A side-by-side denoiser timing (ms per slice, eager PyTorch vs onnxruntime, same process, same random batch)
comes first.

Usage::

    python benchmarks/predict.py [--data ../shared/data] [--size 240] [--features 32] [--synthetic-slices 300]
                                 [--backends torch onnx] [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Predict latency"


def build_model(out: Path, size: int, features: int, depth: int = 50) -> Path:
    import torch

    from covidctnet.config import config_to_dict
    from covidctnet.model_dir import save_model_dir
    from covidctnet.models.bcdunet import BCDUNet
    from covidctnet.models.cnn3d import build_classifier
    from covidctnet.preprocess import PreprocessConfig

    torch.manual_seed(0)
    den = BCDUNet(features=features)
    cls = build_classifier("covidctnet3d", input_size=(depth, size, size))
    config = {
        "name": f"benchmark-random-f{features}-{size}",
        "preprocess": config_to_dict(PreprocessConfig(size_xy=size)),
        "input": {"depth": depth, "size_xy": size},
        "components": {"denoiser": {"arch": "bcdunet", "kwargs": den.config}, "classifier": cls.spec},
    }
    save_model_dir(out, config, {"denoiser": den.state_dict(), "classifier": cls.state_dict()},
                   "# random weights, for timing only\n")
    return out


def synthetic_scan(path: Path, slices: int) -> Path:
    """A 512×512×slices int16 HU NIfTI (0.7 mm in-plane, 1 mm slices) with body, lungs and spine."""
    import nibabel as nib

    yy, xx = np.mgrid[:512, :512]
    sl = np.full((512, 512), -1024, np.int16)
    sl[((yy - 256) / 200) ** 2 + ((xx - 256) / 240) ** 2 < 1] = 40
    sl[(((yy - 240) / 130) ** 2 + ((xx - 160) / 70) ** 2 < 1) | (((yy - 240) / 130) ** 2 + ((xx - 352) / 70) ** 2 < 1)] = -850
    sl[((yy - 400) / 25) ** 2 + ((xx - 256) / 25) ** 2 < 1] = 900
    vol = np.repeat(sl.T[:, :, None], slices, axis=2)
    nib.save(nib.Nifti1Image(vol, np.diag([-0.7, -0.7, 1.0, 1.0])), str(path))
    return path


def time_denoiser(model: Path, onnx_dir: Path | None, batch: int, repeats: int) -> dict[str, float]:
    """Median ms per slice of the denoiser alone on one random (batch, 1, S, S) batch, per backend, interleaved."""
    import torch

    from covidctnet.residuals import load_denoiser

    den = load_denoiser(model, "cpu")
    x = torch.rand((batch, 1, den.size_xy, den.size_xy), generator=torch.Generator().manual_seed(0))
    runners = {"torch": den.model}
    if onnx_dir is not None:
        from covidctnet.onnx_export import load_onnx_component, load_onnx_manifest

        runners["onnx"] = load_onnx_component(*load_onnx_manifest(onnx_dir), "denoiser")
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for name, run in runners.items():  # warm-up (allocations, onnxruntime graph optimisation)
            run(x)
        for _ in range(repeats):  # interleaved, so both see the same machine load
            for name, run in runners.items():
                t = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) / batch for k, v in times.items()}


def time_one(scan: str, model: str, out: str, batch_size: int, backend: str = "torch") -> dict:
    """Predict one scan in a fresh subprocess; returns the report's seconds per step and the peak RSS."""
    code = (
        "import json, time, logging\n"
        # VmHWM is this process's own peak RSS: ru_maxrss would carry over the parent's peak across fork + exec
        "def peak_mb():\n"
        "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "    return int(line.split()[1]) / 1024\n"
        "from covidctnet.predict import PredictConfig, predict_studies\n"
        f"t = time.perf_counter(); s = predict_studies([{scan!r}], {model!r}, {out!r}, "
        f"PredictConfig(batch_size={batch_size}, device='cpu', backend={backend!r}))\n"
        "total = time.perf_counter() - t\n"
        f"row = json.load(open({out!r} + '/report.json'))['studies'][0]\n"
        "print(json.dumps({'seconds': row['seconds'], 'status': row['status'], 'total_incl_model_load': total, "
        "'peak_rss_mb': peak_mb()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--model", type=Path, default=None, help="a real model directory (default: random weights)")
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--synthetic-slices", type=int, nargs="*", default=[300])
    parser.add_argument("--backends", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"])
    parser.add_argument("--scans", nargs="*", default=["covid-P001", "cap-cap001", "control-normal001"],
                        help="real DICOM series under DATA/ct-dicom")
    parser.add_argument("--denoiser-repeats", type=int, default=5, help="timed batches of the denoiser timing")
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = args.model or build_model(tmp_path / "model", args.size, args.features)
        models = {"torch": model}
        if "onnx" in args.backends:
            from covidctnet.onnx_export import export_onnx

            t = time.perf_counter()
            models["onnx"] = export_onnx(model, tmp_path / "onnx").out_dir
            print(f"export-onnx: {time.perf_counter() - t:.1f} s", flush=True)
        den_ms = time_denoiser(model, models.get("onnx"), args.batch_size, args.denoiser_repeats)
        print("denoiser ms/slice", json.dumps(den_ms), flush=True)
        scans = [args.data / "ct-dicom" / n for n in args.scans]
        scans += [synthetic_scan(tmp_path / f"synthetic_{n}.nii.gz", n) for n in args.synthetic_slices]
        rows = []
        for i, scan in enumerate(scans):
            for backend in args.backends:
                res = time_one(str(scan), str(models[backend]), str(tmp_path / f"out{i}{backend}"), args.batch_size,
                               backend)
                rows.append((scan.name, backend, res))
                print(scan.name, backend, json.dumps(res), flush=True)

    lines = [
        SECTION,
        "",
        f"`python benchmarks/predict.py --size {args.size} --features {args.features} --backends "
        f"{' '.join(args.backends)}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, device cpu, batch {args.batch_size} slices. Model: "
        + (f"`{args.model}`" if args.model else f"random weights, BCDU-Net width {args.features} at "
           f"{args.size}×{args.size}, CovidCTNet 3D CNN at 50×{args.size}×{args.size}")
        + ". Seconds per step from `report.json`; total includes loading the model in a fresh process. "
        f"Load average when the run started: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} cores "
        "(shared machine: above the core count, other jobs took CPU and the figures are upper bounds).",
        "",
        f"Denoiser alone, {args.size}×{args.size}, width {args.features}, batch {args.batch_size}, median of "
        f"{args.denoiser_repeats} interleaved batches: "
        + ", ".join(f"{k} {v:.1f} ms/slice" for k, v in den_ms.items())
        + (f" (onnxruntime {den_ms['torch'] / den_ms['onnx']:.2f}× eager PyTorch)." if "onnx" in den_ms else "."),
        "",
        "| scan | backend | read + checks s | preprocess s | denoise s | classify s | total s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, backend, r in rows:
        s = r["seconds"]
        lines.append(f"| {name} | {backend} | {s['read']:.2f} | {s['preprocess']:.2f} | {s['denoise']:.2f} "
                     f"| {s['classify']:.2f} | {r['total_incl_model_load']:.1f} | {r['peak_rss_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        from _docs import replace_section

        replace_section(args.write_docs, SECTION, text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
