"""Benchmark: `covidctnet predict` latency per scan on CPU, split into read, preprocess, denoise and classify, with
the peak RSS of the process.

Latency does not depend on the weights' values, so by default the benchmark builds a model directory with randomly
initialised networks of the chosen size (official BCDU-Net width 32 at 240×240, CovidCTNet 3D CNN at 50×240×240);
``--model`` times a real model directory instead. Each scan runs in its own subprocess (peak RSS per scan).

Variants (``--variants``, all by default): ``torch:fp32`` (eager PyTorch), ``torch:bf16`` (``--precision bf16``:
bfloat16 autocast, channels-last) and ``onnx:fp32`` (``--backend onnx``; the model directory is exported once with
``covidctnet.inference.onnx_export.export_onnx``, which checks the export against PyTorch). Two model sizes by default: 240×240
(the default preprocessing) and 128×128 (the official code's). For each size a side-by-side denoiser timing (ms per
slice, same process, same random batch) comes first; then the real scans (first size only), a synthetic 300-slice
scan (every size) and a synthetic 512×512×600 scan for peak memory (first size only).

Usage::

    python benchmarks/predict.py [--data ../shared/data] [--sizes 240 128] [--features 32] [--synthetic-slices 300]
                                 [--memory-slices 600] [--variants torch:fp32 torch:bf16 onnx:fp32]
                                 [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

    from covidctnet.core.config import config_to_dict
    from covidctnet.core.model_dir import save_model_dir
    from covidctnet.models.bcdunet import BCDUNet
    from covidctnet.models.cnn3d import build_classifier
    from covidctnet.preprocessing.preprocess import PreprocessConfig

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


def time_denoiser(model: Path, onnx_dir: Path | None, batch: int, repeats: int, bf16: bool) -> dict[str, float]:
    """Median ms per slice of the denoiser alone on one random (batch, 1, S, S) batch, per variant, interleaved."""
    import contextlib

    import torch

    from covidctnet.models.registry import load_denoiser

    den = load_denoiser(model, "cpu")
    x = torch.rand((batch, 1, den.size_xy, den.size_xy), generator=torch.Generator().manual_seed(0))
    runners = {"torch:fp32": (den.model, x, contextlib.nullcontext)}
    if bf16:  # what compute_residual does for precision bf16: channels-last weights and input, bfloat16 autocast
        import copy

        net = copy.deepcopy(den.model).to(memory_format=torch.channels_last)
        runners["torch:bf16"] = (net, x.to(memory_format=torch.channels_last),
                                 lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    if onnx_dir is not None:
        from covidctnet.inference.onnx_export import load_onnx_component, load_onnx_manifest

        runners["onnx:fp32"] = (load_onnx_component(*load_onnx_manifest(onnx_dir), "denoiser"), x,
                                contextlib.nullcontext)
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for net, inp, ctx in runners.values():  # warm-up (allocations, oneDNN kernels, onnxruntime optimisation)
            with ctx():
                net(inp)
        for _ in range(repeats):  # interleaved, so every variant sees the same machine load
            for name, (net, inp, ctx) in runners.items():
                with ctx():
                    t = time.perf_counter()
                    net(inp)
                    times[name].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) / batch for k, v in times.items()}


def gemm_gflops(repeats: int = 3, n: int = 4096) -> dict[str, float]:
    """This machine's dense matrix-multiply throughput (GFLOP/s, all torch threads): the ceiling a convolution
    network can approach, fp32 and bf16 (AMX / AVX512-BF16 where present)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best / 1e9
    return out


def denoiser_gflop(model: Path) -> float:
    """Floating-point operations of one slice through the denoiser (torch's FLOP counter: convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from covidctnet.models.registry import load_denoiser

    den = load_denoiser(model, "cpu")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        den.model(torch.rand(1, 1, den.size_xy, den.size_xy))
    return counter.get_total_flops() / 1e9


def time_one(scan: str, model: str, out: str, batch_size: int, variant: str) -> dict:
    """Predict one scan in a fresh subprocess; returns the report's seconds per step and the peak RSS."""
    backend, precision = variant.split(":")
    code = (
        "import json, time, logging\n"
        # VmHWM is this process's own peak RSS: ru_maxrss would carry over the parent's peak across fork + exec
        "def peak_mb():\n"
        "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "    return int(line.split()[1]) / 1024\n"
        "from covidctnet.inference.predict import PredictConfig, predict_studies\n"
        f"t = time.perf_counter(); s = predict_studies([{scan!r}], {model!r}, {out!r}, "
        f"PredictConfig(batch_size={batch_size}, device='cpu', backend={backend!r}, precision={precision!r}))\n"
        "total = time.perf_counter() - t\n"
        f"row = json.load(open({out!r} + '/report.json'))['studies'][0]\n"
        "print(json.dumps({'seconds': row['seconds'], 'status': row['status'], 'total_incl_model_load': total, "
        "'peak_rss_mb': peak_mb(), 'p': [row['p_control'], row['p_covid'], row['p_cap']]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{scan} {variant}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


VARIANTS = ("torch:fp32", "torch:bf16", "onnx:fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--model", type=Path, default=None, help="a real model directory (default: random weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[240, 128],
                        help="in-plane sizes of the random models (240: default preprocessing, 128: official)")
    parser.add_argument("--features", type=int, default=32, help="BCDU-Net base width (official 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--synthetic-slices", type=int, nargs="*", default=[300])
    parser.add_argument("--memory-slices", type=int, default=600,
                        help="a 512x512xN scan predicted at the first size for peak RSS (0: skip)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--scans", nargs="*", default=["covid-P001", "cap-cap001", "control-normal001"],
                        help="real DICOM series under DATA/ct-dicom, predicted at the first size")
    parser.add_argument("--denoiser-repeats", type=int, default=5, help="timed batches of the denoiser timing")
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    sizes = [None] if args.model else args.sizes

    den_ms: dict[str, dict[str, float]] = {}
    gflop: dict[str, float] = {}
    peak = gemm_gflops()
    print("GEMM GFLOP/s", json.dumps(peak), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        synthetic = {n: synthetic_scan(tmp_path / f"synthetic_{n}.nii.gz", n) for n in args.synthetic_slices}
        for k, size in enumerate(sizes):
            model = args.model or build_model(tmp_path / f"model{size}", size, args.features)
            label = str(args.model) if args.model else f"{size}×{size}, width {args.features}"
            models = {"torch": model}
            if any(v.startswith("onnx") for v in args.variants):
                from covidctnet.inference.onnx_export import export_onnx

                t = time.perf_counter()
                models["onnx"] = export_onnx(model, tmp_path / f"onnx{size}").out_dir
                print(f"{label}: export-onnx {time.perf_counter() - t:.1f} s", flush=True)
            den_ms[label] = time_denoiser(model, models.get("onnx"), args.batch_size, args.denoiser_repeats,
                                          "torch:bf16" in args.variants)
            gflop[label] = denoiser_gflop(model)
            print(label, "denoiser ms/slice", json.dumps(den_ms[label]), flush=True)
            scans = [args.data / "ct-dicom" / n for n in args.scans] if k == 0 else []
            scans += list(synthetic.values())
            if k == 0 and args.memory_slices:
                scans.append(synthetic_scan(tmp_path / f"synthetic_{args.memory_slices}.nii.gz", args.memory_slices))
            for i, scan in enumerate(scans):
                for variant in args.variants:
                    res = time_one(str(scan), str(models[variant.split(":")[0]]),
                                   str(tmp_path / f"out{size}_{i}_{variant.replace(':', '_')}"), args.batch_size,
                                   variant)
                    rows.append((label, scan.name, variant, res))
                    print(label, scan.name, variant, json.dumps(res), flush=True)
                if args.memory_slices and scan.name == f"synthetic_{args.memory_slices}.nii.gz":
                    scan.unlink()

    from _docs import cpu_model

    lines = [
        SECTION,
        "",
        f"`python benchmarks/predict.py` ({' '.join(sys.argv[1:]) or 'defaults'}) on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, "
        f"{cpu_model()}, {os.cpu_count()} CPUs, device cpu, batch {args.batch_size} slices, torch "
        f"{__import__('torch').__version__}. Model: "
        + (f"`{args.model}`" if args.model else f"random weights (latency does not depend on their values), BCDU-Net "
           f"width {args.features} at each size, CovidCTNet 3D CNN at 50×size×size")
        + ". Each scan and variant runs in a fresh process: seconds per step from `report.json`, total including "
        "loading the model, peak RSS of that process (VmHWM). Load average when the run started: "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} cores (above the core count, other jobs "
        "took CPU and the figures are upper bounds). Synthetic scans: 512×512, 0.7 mm pixels, 1 mm slices, so N "
        "slices stay N slices after resampling and the denoiser runs N times.",
        "",
        "Denoiser alone, median ms per slice over interleaved batches (same random batch), and the arithmetic rate "
        "it reached (GFLOP per slice from torch's FLOP counter ÷ time). For scale, a 4096² matrix product on this "
        f"machine runs at {peak['fp32']:.0f} GFLOP/s in fp32 and {peak['bf16']:.0f} GFLOP/s in bf16: no fp32 "
        "backend can run a convolution network faster than the fp32 figure allows.",
        "",
        "| model | GFLOP / slice | " + " | ".join(f"{v} ms (GFLOP/s)" for v in VARIANTS)
        + " | onnx:fp32 vs torch:fp32 | torch:bf16 vs torch:fp32 |",
        "|---|" + "---:|" * (len(VARIANTS) + 3),
    ]
    for label, ms in den_ms.items():
        cells = [f"{ms[v]:.1f} ({gflop[label] / ms[v] * 1000:.0f})" if v in ms else "" for v in VARIANTS]
        ratios = [f"{ms['torch:fp32'] / ms[v]:.2f}×" if v in ms else "" for v in ("onnx:fp32", "torch:bf16")]
        lines.append(f"| {label} | {gflop[label]:.2f} | " + " | ".join(cells + ratios) + " |")
    lines += [
        "",
        "| model | scan | variant | read + checks s | preprocess s | denoise s | classify s | total s | peak RSS MB | "
        "p (control, covid, cap) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, name, variant, r in rows:
        s = r["seconds"]
        lines.append(f"| {label} | {name} | {variant} | {s['read']:.2f} | {s['preprocess']:.2f} | "
                     f"{s['denoise']:.2f} | {s['classify']:.2f} | {r['total_incl_model_load']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {', '.join(f'{p:.4f}' for p in r['p'])} |")
    lines += ["", "Targets (issue #8):", ""]
    for n in args.synthetic_slices:
        best = [(r["total_incl_model_load"], label, variant) for label, name, variant, r in rows
                if name == f"synthetic_{n}.nii.gz"]
        for label in dict.fromkeys(b[1] for b in best):
            mine = sorted(b for b in best if b[1] == label)
            target = f" (target for 300 slices ≤ 15 s: {'met' if mine[0][0] <= 15 else 'not met'})" if n == 300 else ""
            lines.append(f"- {n}-slice scan, {label}: fastest {mine[0][2]} {mine[0][0]:.1f} s including model load"
                         f"{target}; " + ", ".join(f"{v} {t:.1f} s" for t, _, v in mine[1:]))
    for label, ms in den_ms.items():
        if "onnx:fp32" in ms:
            ratio = ms["torch:fp32"] / ms["onnx:fp32"]
            need = 2 * gflop[label] / ms["torch:fp32"] * 1000
            lines.append(f"- onnxruntime vs eager PyTorch, denoiser {label}, fp32: {ratio:.2f}× (target ≥ 2×: "
                         f"{'met' if ratio >= 2 else 'not met'}; 2× would need {need:.0f} GFLOP/s, "
                         f"{100 * need / peak['fp32']:.0f}% of this machine's fp32 matrix-product rate)")
    if args.memory_slices:
        mem = [(r["peak_rss_mb"], v) for _, name, v, r in rows if name == f"synthetic_{args.memory_slices}.nii.gz"]
        if mem:
            lines.append(f"- peak RSS of predict on 512×512×{args.memory_slices}: "
                         + ", ".join(f"{v} {m / 1024:.2f} GB" for m, v in mem)
                         + f" (target ≤ 3 GB: {'met' if max(m for m, _ in mem) <= 3072 else 'not met'})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        from _docs import replace_section

        replace_section(args.write_docs, SECTION, text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
