"""Benchmark: process-pool scaling of ``preprocess`` and ``predict`` over many studies, inline vs 1 vs 2 workers.

The studies are synthetic 512×512 CT volumes (NIfTI, 0.7 mm pixels, 1 mm slices) of equal size, so every worker
gets the same amount of work. ``--workers N`` spawns N processes with ``cpu_count // N`` torch threads each; inline
(``--workers 0``) runs in this process with all threads. Every run must give the inline outputs: preprocess byte for
byte, predict to 1e-5 (a different thread count may reorder floating-point sums).

Usage::

    python benchmarks/scaling.py [--studies 6] [--slices 150] [--workers 0 1 2] [--size 128] [--features 32]
                                 [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Process-pool scaling"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=150, help="slices per synthetic study (1 mm)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=128, help="preprocessing size and random model input")
    parser.add_argument("--features", type=int, default=32, help="BCDU-Net width of the random model")
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()

    from _docs import cpu_model
    from predict import build_model, synthetic_scan

    from covidctnet.inference.predict import PredictConfig, predict_studies
    from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_studies

    results: dict[str, dict[int, float]] = {"preprocess": {}, "predict": {}}
    mismatch: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "scans").mkdir()
        first = synthetic_scan(tmp_path / "scans" / "study0.nii.gz", args.slices)
        scans = [first] + [first.with_name(f"study{i}.nii.gz") for i in range(1, args.studies)]
        for s in scans[1:]:
            os.link(first, s)  # the same bytes under another study id: equal work per study
        model = build_model(tmp_path / "model", args.size, args.features)
        ref_pre: dict[str, bytes] = {}
        ref_p: dict[str, list[float]] = {}
        for w in args.workers:
            out = tmp_path / f"pre{w}"
            t = time.perf_counter()
            summary = preprocess_studies(scans, out, PreprocessConfig(size_xy=args.size), workers=w)
            results["preprocess"][w] = time.perf_counter() - t
            assert summary.n_ok == args.studies, summary.rows
            outputs = {f.name: f.read_bytes() for f in out.glob("*.nii.gz")}
            ref_pre = ref_pre or outputs
            if outputs != ref_pre:
                mismatch.append(f"preprocess --workers {w}")
            out = tmp_path / f"pred{w}"
            t = time.perf_counter()
            summary = predict_studies(scans, model, out, PredictConfig(device="cpu"), workers=w)
            results["predict"][w] = time.perf_counter() - t
            rows = json.loads((out / "report.json").read_text())["studies"]
            probs = {r["study_id"]: [r["p_control"], r["p_covid"], r["p_cap"]] for r in rows}
            ref_p = ref_p or probs
            if any(abs(a - b) > 1e-5 for k in probs for a, b in zip(probs[k], ref_p[k])):
                mismatch.append(f"predict --workers {w}")
            print(w, {k: round(v[w], 1) for k, v in results.items()}, flush=True)

    def label(w: int) -> str:
        return "inline (0)" if w == 0 else str(w)

    lines = [
        SECTION,
        "",
        f"`python benchmarks/scaling.py` ({' '.join(sys.argv[1:]) or 'defaults'}) on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, "
        f"{cpu_model()}, {os.cpu_count()} CPUs. {args.studies} synthetic studies of 512×512×{args.slices} (1 mm "
        f"slices); preprocess at {args.size}×{args.size}; predict with a random-weight model (BCDU-Net width "
        f"{args.features} at {args.size}×{args.size}, CovidCTNet 3D CNN), torch fp32 on the CPU. Wall seconds for "
        "the whole batch, including starting the worker processes and loading the model in each. Load average "
        f"when the run started: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}.",
        "",
        "| stage | workers | torch threads per worker | wall s | studies / min | speed-up vs 1 worker |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for stage, times in results.items():
        one = times.get(1)
        for w, sec in times.items():
            threads = os.cpu_count() if w == 0 else max(1, (os.cpu_count() or 1) // w)
            speed = f"{one / sec:.2f}×" if one else ""
            lines.append(f"| {stage} | {label(w)} | {threads} | {sec:.1f} | {60 * args.studies / sec:.1f} | {speed} |")
    lines += ["", "Outputs: " + ("every run gave the inline outputs (preprocess byte-identical, predict to 1e-5)."
                                 if not mismatch else "DIFFERENT from inline: " + ", ".join(mismatch))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        from _docs import replace_section

        replace_section(args.write_docs, SECTION, text)
    if mismatch:
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
