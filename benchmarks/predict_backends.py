"""Benchmark (issue 15, item 4): CPU backends and precisions of `covidctnet predict` at 240×240, BCDU-Net width 32,
against this machine's measured matrix-product ceiling, with the accuracy gate on the full shared series.

Three parts, each interleaved so that every variant sees the same machine load:

1. **Denoiser alone**: ms per slice (wall and process CPU time) of one batch of real control slices, per variant;
   GFLOP/s from torch's FLOP counter, set against a 2048² matrix product in fp32, bf16 and int8 (``torch._int_mm``)
   timed between the rounds. Variants: ``torch:fp32``, ``torch:bf16`` (autocast, channels-last), ``onnx:fp32``
   (onnxruntime), ``openvino:fp32``, ``openvino:bf16`` and int8: the denoiser of ``export-onnx
   --int8-calibration`` (:mod:`covidctnet.inference.int8`: onnxruntime static quantisation, convolutions only,
   calibrated on 32 slices of a control series that is not gated) run by onnxruntime (``onnx:int8``) and by OpenVINO
   (``openvino:int8``).
2. **Whole process**: ``covidctnet predict`` on the full control-normal001 series (154 DICOM slices, 308 after
   resampling to 1 mm), a fresh process per variant as a user runs it (imports and model load included), with its
   wall time, its CPU time and the load average when it started.
3. **Accuracy gate** (on unless ``--no-gate``): every variant against torch fp32 on the full covid, CAP and control series with the
   bundled demo model (trained weights; 128×128, width 16): correlation of the residual maps (the classifier's
   input) and the largest change of a probability. Gate: correlation ≥ 0.99 and change ≤ 0.01.

The random-weight model's latency does not depend on its weights (``benchmarks/predict.py``). The machine may be
shared: CPU seconds and the fraction of the ceiling measured at the same moment are the load-robust figures.

With ``--auto`` it measures issue 26 instead (section :data:`AUTO_SECTION`): the default ``covidctnet predict``
(``--backend auto``) against ``--backend torch`` as whole processes, side by side, on the same series and model, the
first ``auto`` run (its ONNX export built into an empty ``XDG_CACHE_HOME``) and the later ones (cache reused) apart;
and ``predict-slice`` of the 118 UCSD validation images with the bundled slice model likewise. Each process's cores
(CPU s ÷ wall s) and the load average when it started are recorded, and ``uptime`` before and after.

Usage::

    python benchmarks/predict_backends.py [--data ../shared/data] [--repeats 3] [--no-gate] [--whole VARIANT ...]
                                          [--results raw.json] [--write-docs docs/benchmarks.md]
    python benchmarks/predict_backends.py --render raw.json --write-docs docs/benchmarks.md
    python benchmarks/predict_backends.py --auto [--auto-repeats 1] [--results raw.json] [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Predict on CPU: backends and precisions (issue 15)"
AUTO_SECTION = "## Predict on CPU: backend auto against PyTorch (issue 26)"
VARIANTS = ("torch:fp32", "torch:bf16", "onnx:fp32", "openvino:fp32", "openvino:bf16", "onnx:int8", "openvino:int8")
WHOLE = VARIANTS  # all are `predict` options
GATED_SERIES = ("covid-P001", "cap-cap001", "control-normal001")
CALIBRATION_SERIES = "control-4dlung-113"  # a control series, not among the gated ones


def ceilings(n: int = 2048, repeats: int = 2) -> dict[str, float]:
    """GFLOP/s (int8: GOP/s) of an n² matrix product, best of ``repeats``, in wall time and per CPU second."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        a = torch.randint(-100, 100, (n, n)).to(dtype)
        b = torch.randint(-100, 100, (n, n)).to(dtype)
        mm = torch._int_mm if dtype == torch.int8 else torch.matmul
        mm(a, b)
        wall = cpu = float("inf")
        for _ in range(repeats):
            c, t = time.process_time(), time.perf_counter()
            mm(a, b)
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        out[name], out[f"{name}_per_cpu_s"] = 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9
    return out


def preprocessed(series: Path, model: Path) -> np.ndarray:
    """A DICOM series preprocessed as ``model``'s config says: (X, Y, Z) float32 in [0, 1]."""
    from covidctnet.core.model_dir import load_model_dir
    from covidctnet.io.volume import read_volume
    from covidctnet.preprocessing.preprocess import preprocess_volume, recorded_preprocess

    return preprocess_volume(read_volume(series), recorded_preprocess(load_model_dir(model)))[0]


def export(model: Path, out: Path, data: Path) -> Path:
    """``model`` exported to ONNX with an int8 denoiser calibrated on :data:`CALIBRATION_SERIES` (as ``export-onnx
    --int8-calibration`` does, its gate included)."""
    from covidctnet.inference.onnx_export import export_onnx

    return export_onnx(model, out, int8_calibration=[data / "ct-dicom-full" / CALIBRATION_SERIES]).out_dir


def networks(model: Path, onnx_dir: Path, variants: tuple[str, ...]) -> dict[str, object]:
    """A callable per variant: torch modules (bf16 under autocast, channels-last), onnxruntime or OpenVINO."""
    import torch

    from covidctnet.inference.onnx_export import OnnxModule
    from covidctnet.inference.openvino_backend import OpenVinoModule
    from covidctnet.models.registry import load_denoiser

    den = load_denoiser(model, "cpu").model
    bf16 = copy.deepcopy(den).to(memory_format=torch.channels_last)  # as compute_residual does for bf16

    def torch_bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return bf16(x.contiguous(memory_format=torch.channels_last)).float()

    make = {
        "torch:fp32": lambda: den,
        "torch:bf16": lambda: torch_bf16,
        "onnx:fp32": lambda: OnnxModule(onnx_dir / "denoiser.onnx"),
        "openvino:fp32": lambda: OpenVinoModule(onnx_dir / "denoiser.onnx", "fp32"),
        "openvino:bf16": lambda: OpenVinoModule(onnx_dir / "denoiser.onnx", "bf16"),
        "onnx:int8": lambda: OnnxModule(onnx_dir / "denoiser_int8.onnx"),
        "openvino:int8": lambda: OpenVinoModule(onnx_dir / "denoiser_int8.onnx", "fp32"),  # as predict compiles it
    }
    return {v: make[v]() for v in variants}


def time_denoiser(nets: dict[str, object], x, repeats: int) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Median wall and CPU ms per slice of one batch per variant, interleaved, with the ceilings between rounds."""
    import torch

    wall: dict[str, list[float]] = {k: [] for k in nets}
    cpu: dict[str, list[float]] = {k: [] for k in nets}
    ceils = []
    with torch.inference_mode():
        for net in nets.values():  # warm-up: allocations, kernel selection
            net(x)
        for _ in range(repeats):
            ceils.append(ceilings())
            for name, net in nets.items():
                c, t = time.process_time(), time.perf_counter()
                net(x)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    b = x.shape[0]
    return {k: {"wall_ms": 1000 * float(np.median(wall[k])) / b, "cpu_ms": 1000 * float(np.median(cpu[k])) / b}
            for k in nets}, ceils


def whole_process(scan: Path, model: Path, onnx_dir: Path, variant: str, out: Path) -> dict:
    """``covidctnet predict`` in a fresh process: wall and CPU seconds of the process, report.json's steps."""
    backend, precision = variant.split(":")
    cmd = [sys.executable, "-m", "covidctnet", "predict", str(scan), "-o", str(out), "--device", "cpu",
           "--model", str(model if backend == "torch" else onnx_dir), "--backend", backend, "--precision", precision]
    load = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{variant}: {proc.stderr.strip().splitlines()[-1:]}")
    row = json.loads((out / "report.json").read_text())["studies"][0]
    return {"wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "load": load, "steps": row["seconds"], "p": [row["p_control"], row["p_covid"], row["p_cap"]]}


def gate(data: Path, model: Path, onnx_dir: Path, variants: tuple[str, ...]) -> list[dict]:
    """Residual-map correlation and largest probability change of each variant against torch fp32, per series."""
    import torch

    from covidctnet.inference.predict import load_pipeline
    from covidctnet.inference.residuals import compute_residual
    from covidctnet.models.cnn3d import predict_proba, residual_to_network_input
    from covidctnet.models.registry import Denoiser

    pipe = load_pipeline(model, "cpu")
    den = pipe.denoiser
    # the torch variants run as predict runs them (compute_residual's precision), the others through the same Denoiser
    nets = {v: den for v in variants if v.startswith("torch:")}
    nets |= networks(model, onnx_dir, tuple(v for v in variants if not v.startswith("torch:")))
    rows = []
    for name in GATED_SERIES:
        vol = preprocessed(data / "ct-dicom-full" / name, model)
        ref = None
        for variant, net in nets.items():
            if not isinstance(net, Denoiser):
                net = Denoiser(net, den.size_xy, den.path, den.weights_sha256, torch.device("cpu"), den.preprocess)
            residual = compute_residual(vol, net, pipe.depth, pipe.size_xy, 8, source=name,
                                        precision=variant.split(":")[1] if variant.startswith("torch:") else "fp32")
            p = predict_proba(pipe.classifier, residual_to_network_input(residual)[None])[0].numpy()
            ref = ref or (residual, p)
            rows.append({"series": name, "slices": vol.shape[2], "variant": variant,
                         "corr": float(np.corrcoef(residual.ravel(), ref[0].ravel())[0, 1]),
                         "dp": float(np.abs(p - ref[1]).max()), "p": [float(v) for v in p]})
            print("gate", json.dumps(rows[-1]), flush=True)
    return rows


def timed_process(cmd: list[str], env: dict[str, str], out: Path, kind: str) -> dict:
    """One command as a fresh process: wall and CPU seconds, cores used, load average at its start, and what it wrote
    (predict: report.json's backend, probabilities and steps; predict-slice: p_covid per image)."""
    load = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:5])}: {proc.stderr.strip().splitlines()[-3:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    row = {"wall_s": wall, "cpu_s": cpu, "cores": cpu / wall, "load": load,
           "exported": "exporting to ONNX once" in proc.stderr}
    if kind == "predict":
        report = json.loads((out / "report.json").read_text())
        study = report["studies"][0]
        row |= {"backend": report["backend"], "p": [study["p_control"], study["p_covid"], study["p_cap"]],
                "steps": study["seconds"]}
    else:
        import csv

        with open(out / "preds.csv", newline="") as fh:
            row["p"] = [float(r["p_covid"]) for r in csv.DictReader(fh)]
    return row


def auto_vs_torch(data: Path, scan: str, size: int, features: int, repeats: int) -> dict:
    """Issue 26: default predict / predict-slice (auto) against --backend torch, whole processes, interleaved."""
    from _docs import cpu_model
    from predict import build_model

    from covidctnet.data.ucsd import read_split_list

    started = time.strftime("%Y-%m-%d %H:%M")
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model", size, features)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}  # empty: the first auto run builds the export
        val = tmp / "val"  # the 118 validation images of the UCSD split, as one folder
        val.mkdir()
        root = data / "covid-ct-2d"
        for cls, folder in (("COVID", "CT_COVID"), ("NonCOVID", "CT_NonCOVID")):
            for name in read_split_list(root / "Data-split" / cls / f"valCT_{cls}.txt"):
                (val / name).symlink_to(root / folder / name)
        n_images = len(list(val.iterdir()))
        commands = {
            "predict": [sys.executable, "-m", "covidctnet", "predict", str(data / "ct-dicom-full" / scan),
                        "--model", str(model), "--device", "cpu"],
            "predict-slice": [sys.executable, "-m", "covidctnet", "predict-slice", str(val), "--device", "cpu"],
        }
        for command, cmd in commands.items():
            order = ["torch", "auto", "auto"] + ["torch", "auto"] * repeats  # the first auto run builds the cache
            for i, variant in enumerate(order):
                out = tmp / f"{command}-{i}"
                row = timed_process(cmd + ["-o", str(out)] + (["--backend", "torch"] if variant == "torch" else []),
                                    env, out, command.split("-")[0] if command == "predict" else "slice")
                key = "auto, first run" if variant == "auto" and row["exported"] else variant
                runs.setdefault(f"{command}|{key}", []).append(row)
                print(command, key, json.dumps(row), flush=True)
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    import torch

    return {"started": started, "uptime": uptime, "cpu": cpu_model(), "cpus": os.cpu_count(), "nice": os.nice(0),
            "torch": torch.__version__, "scan": scan, "size": size, "features": features, "images": n_images,
            "runs": runs}


def auto_report(r: dict) -> str:
    """The issue 26 section (markdown) from :func:`auto_vs_torch`'s figures."""
    def med(rows: list[dict], key: str) -> float:
        return float(np.median([x[key] for x in rows]))

    cores = r["cpus"]
    used = [x["cores"] for rows in r["runs"].values() for x in rows]
    lines = [
        AUTO_SECTION, "",
        (f"`python benchmarks/predict_backends.py --auto` on {r['started']}, {r['cpu']}, {cores} CPUs, torch "
         f"{r['torch']}, run at nice {r['nice']}. Whole processes as a user runs them (imports, model load, reading, "
         "preprocessing, lung mask, denoising, classification, report), one after the other in the order "
         "torch, auto (first run: empty cache, so it builds the ONNX export), auto (cache reused), then any further "
         "torch/auto pairs. "
         f"`predict`: the full {r['scan']} series with a random-weight model at {r['size']}×{r['size']}, BCDU-Net "
         f"width {r['features']} (`--device cpu`); `predict-slice`: the {r['images']} UCSD validation images with the "
         "bundled slice model (5-member ResNet-18 ensemble)."),
        "",
        (f"**Taken under load**: `uptime` before: `{r['uptime'][0]}`; after: `{r['uptime'][1]}`. The machine was "
         "shared with other workers and a training job, so wall times are long and noisy; the processes got "
         f"{min(used):.2f}–{max(used):.2f} of the {cores} cores (CPU s ÷ wall s, last column). What matters is the "
         "ratio to `--backend torch` measured in the same run."),
        "",
        "| command | backend | runs | wall s (median) | CPU s (median) | ratio to torch, wall | ratio, CPU | "
        "backend used | load average at start | cores used |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for command in ("predict", "predict-slice"):
        torch_rows = r["runs"].get(f"{command}|torch", [])
        for key in ("torch", "auto, first run", "auto"):
            rows = r["runs"].get(f"{command}|{key}", [])
            if not rows:
                continue
            backend = rows[0].get("backend") or ("torch" if key == "torch" else "auto (preds.csv does not say)")
            lines.append(
                f"| {command} | {key} | {len(rows)} | {med(rows, 'wall_s'):.1f} | {med(rows, 'cpu_s'):.1f} | "
                f"{med(rows, 'wall_s') / med(torch_rows, 'wall_s'):.2f} | "
                f"{med(rows, 'cpu_s') / med(torch_rows, 'cpu_s'):.2f} | {backend} | "
                + ", ".join(f"{x['load'][0]:.1f}" for x in rows) + " | "
                + ", ".join(f"{x['cores']:.2f}" for x in rows) + " |")
    for command in ("predict", "predict-slice"):
        ref = r["runs"].get(f"{command}|torch", [])
        others = [x for k, v in r["runs"].items() if k.startswith(command + "|") and not k.endswith("torch")
                  for x in v]
        if ref and others:
            dp = max(float(np.abs(np.array(x["p"]) - np.array(ref[0]["p"])).max()) for x in others)
            lines += ["", f"`{command}`: largest probability difference between auto and torch: {dp:.2g}."]
    pr = r["runs"].get("predict|torch")
    later = r["runs"].get("predict|auto")
    if pr and later:
        ratio = med(later, "wall_s") / med(pr, "wall_s")
        first = r["runs"].get("predict|auto, first run")
        if first:
            extra = med(first, "wall_s") - med(later, "wall_s")
            lines += ["", (f"The first run's {extra:.0f} s over a later one is the export into the cache (tracing, "
                           "`onnx.checker`, the onnxruntime-against-PyTorch check of both networks) and its OpenVINO "
                           "compilation; it is paid once per model and exporter version.")]
        lines += ["", (f"Target (issue 26): default `predict` ≤ 0.65× `--backend torch`: later runs "
                       f"{ratio:.2f}× ({'met' if ratio <= 0.65 else 'not met'})"
                       + (f", first run with the export {med(first, 'wall_s') / med(pr, 'wall_s'):.2f}×"
                          if first else "") + " (wall, same run, under load). "
                       f"{'Each row is one run' if len(pr) == 1 else 'Rows are medians'}; under this load a single "
                       "run's ratio moves by several hundredths. The issue 15 section above has the same backends "
                       "timed whole on the idle machine with an export made beforehand.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _docs import cpu_model
    from predict import build_model, denoiser_gflop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the denoiser timing")
    parser.add_argument("--scan", default="control-normal001", help="full series (DATA/ct-dicom-full) timed whole")
    parser.add_argument("--whole", nargs="*", choices=WHOLE, default=list(WHOLE),
                        help="variants timed as a whole `covidctnet predict` process, in this order")
    parser.add_argument("--no-gate", dest="gate", action="store_false")
    parser.add_argument("--write-docs", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None, help="also save the raw figures as JSON")
    parser.add_argument("--render", type=Path, default=None, help="only write the section from a --results JSON")
    parser.add_argument("--auto", action="store_true", help="issue 26: default (auto) against --backend torch")
    parser.add_argument("--auto-repeats", type=int, default=0,
                        help="torch/auto pairs after the first three runs (torch, auto building the cache, auto)")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        write(results, args.write_docs, auto_report if "runs" in results else report, AUTO_SECTION if "runs" in
              results else SECTION)
        return
    if args.auto:
        results = auto_vs_torch(args.data, args.scan, args.size, args.features, args.auto_repeats)
        if args.results:
            args.results.write_text(json.dumps(results, indent=1) + "\n")
        write(results, args.write_docs, auto_report, AUTO_SECTION)
        return

    import torch

    from covidctnet.models.registry import DEMO_MODEL

    started, load0 = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    full = args.data / "ct-dicom-full"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model", args.size, args.features)
        onnx_dir = export(model, tmp / "onnx", args.data)
        vol = preprocessed(full / args.scan, model)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol[:, :, 150:150 + args.batch_size], 2, 0)[:, None]))
        ms, ceils = time_denoiser(networks(model, onnx_dir, VARIANTS), x, args.repeats)
        gflop = denoiser_gflop(model)
        print("denoiser", json.dumps(ms), flush=True)
        ceil = {k: float(np.median([c[k] for c in ceils])) for k in ceils[0]}
        print("ceilings", json.dumps(ceil), flush=True)
        whole = {}
        for variant in args.whole:
            whole[variant] = whole_process(full / args.scan, model, onnx_dir, variant,
                                           tmp / f"out_{variant.replace(':', '_')}")
            whole[variant]["ceiling"] = ceilings()
            print("whole", variant, json.dumps(whole[variant]), flush=True)
        gate_rows = []
        if args.gate:
            gate_rows = gate(args.data, DEMO_MODEL, export(DEMO_MODEL, tmp / "demo_onnx", args.data), VARIANTS)

    import onnxruntime
    import openvino

    results = {"started": started, "load": load0, "nice": os.nice(0), "cpu": cpu_model(), "cpus": os.cpu_count(),
               "versions": f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, OpenVINO "
                           f"{openvino.__version__.split('-')[0]}",
               "features": args.features, "size": args.size, "batch_size": args.batch_size, "repeats": args.repeats,
               "scan": args.scan, "slices": vol.shape[2], "gflop": gflop, "denoiser": ms, "ceiling": ceil,
               "whole": whole, "gate": gate_rows}
    if args.results:
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    write(results, args.write_docs)


def write(results: dict, docs: Path | None, render=None, section: str = SECTION) -> None:
    text = (render or report)(results)
    print(text)
    if docs:
        from _docs import replace_section

        replace_section(docs, section, text)


def report(r: dict) -> str:
    """The docs section (markdown) from the figures of one run."""
    ceil, gflop, ms, cores = r["ceiling"], r["gflop"], r["denoiser"], r["cpus"]

    def peak(v: str) -> str:
        return "int8" if v.endswith("int8") else "bf16" if v.endswith("bf16") else "fp32"

    floors = {p: 300 * gflop / (cores * ceil[f"{p}_per_cpu_s"]) for p in ("fp32", "bf16", "int8")}
    load = r["load"]
    # the load average counts this benchmark's own threads; the cores the whole processes got (CPU s ÷ wall s) tell
    # whether other work competed with them
    used = [w["cpu_s"] / w["wall_s"] for w in r["whole"].values()] or [float(cores)]
    shared = min(used) < 0.75 * cores
    lines = [
        SECTION, "",
        (f"`python benchmarks/predict_backends.py` on {r['started']}, {r['cpu']}, {cores} CPUs, {r['versions']}. "
        f"Random-weight BCDU-Net width {r['features']} at {r['size']}×{r['size']} ({gflop:.2f} GFLOP per slice), "
        f"CovidCTNet 3D CNN at 50×{r['size']}×{r['size']}. Load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
        f"on {cores} cores when it started (run at nice {r['nice']}); the whole processes below used "
        f"{min(used):.2f}–{max(used):.2f} cores (CPU s ÷ wall s)"
        + (": **the machine was shared**, so wall times are upper bounds; CPU seconds, and rates against the ceiling "
           "measured at the same moment, are the comparable figures." if shared else ": an idle machine.")),
        "",
        ("Ceiling: a 2048² matrix product timed between the rounds below (median): "
        f"fp32 {ceil['fp32']:.0f} GFLOP/s wall, {ceil['fp32_per_cpu_s']:.0f} per CPU second; "
        f"bf16 {ceil['bf16']:.0f} wall, {ceil['bf16_per_cpu_s']:.0f} per CPU second; "
        f"int8 (`torch._int_mm`) {ceil['int8']:.0f} GOP/s wall, {ceil['int8_per_cpu_s']:.0f} per CPU second. "
        f"At those per-core rates on {cores} idle cores, the denoiser's {300 * gflop / 1000:.1f} TFLOP for 300 slices "
        f"cannot take less than {floors['fp32']:.0f} s in fp32, {floors['bf16']:.0f} s in bf16 and "
        f"{floors['int8']:.0f} s in int8."),
        "",
        (f"Denoiser alone, batch of {r['batch_size']} real control slices, median of {r['repeats']} interleaved rounds "
        f"(the last column: 300 slices at this CPU time on {cores} idle cores):"),
        "",
        ("| variant | wall ms / slice | CPU ms / slice | GFLOP per CPU second | of the ceiling (same precision) "
        "| 300 slices, idle estimate |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v, m in ms.items():
        rate = gflop / m["cpu_ms"] * 1000
        lines.append(f"| {v} | {m['wall_ms']:.0f} | {m['cpu_ms']:.0f} | {rate:.0f} | "
                     f"{100 * rate / ceil[peak(v) + '_per_cpu_s']:.0f}% | {300 * m['cpu_ms'] / 1000 / cores:.0f} s |")
    lines += [
        "",
        (f"Whole `covidctnet predict` on the full {r['scan']} series ({r['slices']} slices after preprocessing), a "
        "fresh process each (imports, model load, DICOM read, preprocessing, lung mask, denoising, classification, "
        f"report); the idle estimate is the process's CPU time ÷ {cores} (a lower bound: reading and preprocessing "
        "do not use both cores throughout):"),
        "",
        ("| variant | load average at start | wall s | CPU s | idle estimate s | denoise s (report) | fp32 ceiling then, "
        "GFLOP/s | p (control, covid, cap) |"),
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for v, w in r["whole"].items():
        lines.append(f"| {v} | {w['load'][0]:.2f} | {w['wall_s']:.1f} | {w['cpu_s']:.1f} | {w['cpu_s'] / cores:.1f} | "
                     f"{w['steps']['denoise']:.1f} | {w['ceiling']['fp32']:.0f} | "
                     + ", ".join(f"{p:.4f}" for p in w["p"]) + " |")
    if r["gate"]:
        lines += [
            "",
            ("Accuracy gate against torch fp32, bundled demo model (trained; 128×128, width 16), full shared series "
            f"(int8 calibrated on {CALIBRATION_SERIES}): residual-map correlation / largest probability change:"),
            "",
            "| variant | " + " | ".join(GATED_SERIES) + " | gate (≥ 0.99, ≤ 0.01) |",
            "|---|" + "---|" * (len(GATED_SERIES) + 1),
        ]
        for v in dict.fromkeys(g["variant"] for g in r["gate"]):
            mine = {g["series"]: g for g in r["gate"] if g["variant"] == v}
            ok = all(g["corr"] >= 0.99 and g["dp"] <= 0.01 for g in mine.values())
            lines.append(f"| {v} | " + " | ".join(f"{mine[s]['corr']:.6f} / {mine[s]['dp']:.4f}" for s in GATED_SERIES)
                         + f" | {'holds' if ok else 'fails'} |")
    if not r["whole"]:
        return "\n".join(lines) + "\n"
    best = min(r["whole"].items(), key=lambda kv: kv[1]["cpu_s"])
    wall = min(w["wall_s"] for w in r["whole"].values())
    lines += ["", (f"Target (≤ 15 s for a 300-slice scan, whole process): {'met' if wall <= 15 else 'not met'} "
              f"(fastest wall {wall:.0f} s{' under load' if shared else ''}). Fastest by CPU time: {best[0]}, "
              f"{best[1]['cpu_s']:.0f} CPU s, {best[1]['cpu_s'] / cores:.0f} s estimated on {cores} idle cores.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
