"""Run every benchmark of the project in one go and rewrite ``docs/benchmarks.md``.

Each benchmark script runs in its own process with ``--write-docs DOC`` and replaces only its own ``## `` section;
this script then writes the header of the document (machine: CPU model, cores, memory; date; load average), so the
figures below it say where and when they were measured. A failing benchmark is reported and the others still run
(exit code 1 at the end).

``--quick`` picks small settings for every script (one real scan, fewer repeats, smaller widths): a smoke run that
checks every benchmark still works, not figures to publish. Scripts in ``benchmarks/`` that are not in
:data:`STEPS` are run with their defaults and a warning, so a new benchmark is never silently left out.

Usage::

    nice -n 10 .venv/bin/python benchmarks/run_all.py [--quick] [--only predict perlin] [--dry-run]
                                                      [--docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
logger = logging.getLogger("run_all")

# name -> (script, full-run arguments, --quick arguments); the full run uses each script's own defaults
STEPS: dict[str, tuple[str, list[str], list[str]]] = {
    "preprocess": ("preprocess.py", [], ["--repeats", "1", "--cases", "covid-P001", "--memory-case", ""]),
    "perlin": ("perlin.py", [], ["--repeats", "3", "--batch", "4", "--batch-repeats", "3", "--train-repeats", "2"]),
    "bcdunet": ("bcdunet.py", [], ["--widths", "16", "--steps", "2"]),
    # torch fp32 / torch bf16 / onnx side by side: denoiser ms per slice, predict latency, peak RSS
    "predict": ("predict.py", [], ["--scans", "covid-P001", "--synthetic-slices", "--memory-slices", "0", "--sizes",
                                   "64", "--features", "8", "--denoiser-repeats", "2"]),
    "scaling": ("scaling.py", [], ["--studies", "2", "--slices", "40", "--size", "64", "--features", "4",
                                   "--workers", "0", "2"]),
    "slice_training": ("slice_training.py", [], ["--steps", "1"]),
    # MosMed-size synthetic training sets: peak memory, data waiting, disk (the full run needs ~45 GB and ~1 h)
    "scale": ("scale.py", [], ["--studies", "2", "4", "--residuals", "6", "--steps", "2"]),
}


# scripts here that measure nothing for docs/benchmarks.md
NOT_BENCHMARKS = {"gpu_check.py"}  # `make gpu-check`: CUDA paths against the CPU, on a GPU machine


def machine_header() -> str:
    """The document's header: CPU model, cores, memory, OS, Python/torch versions, date and load average."""
    from _docs import cpu_model

    cpu = cpu_model()
    mem_gb = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024**2
                break
    except OSError:  # not Linux: keep platform's answer
        pass
    try:
        import torch

        torch_v = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        torch_v = "torch not installed"
    load = os.getloadavg()
    return (
        "# Benchmarks\n\n"
        f"Written by `python benchmarks/run_all.py` (each section also by its own script). Machine: {cpu}, "
        f"{os.cpu_count()} logical cores, {mem_gb:.1f} GB memory, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, {torch_v}. Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Load average "
        f"when run_all started: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (a shared machine: a load above the core "
        "count means other jobs took CPU time, and the timings are then upper bounds). Sections may come from "
        "different runs: each states its own command and date.\n\n"
    )


def write_header(doc: Path, header: str) -> None:
    """Replace everything before the first ``## `` section of ``doc`` with ``header``."""
    text = doc.read_text() if doc.exists() else ""
    first = text.find("\n## ")
    body = text[first + 1:] if first != -1 else ""
    doc.write_text(header + body)


def plan(quick: bool, only: list[str] | None) -> list[tuple[str, list[str]]]:
    """``[(name, argv without --write-docs)]`` for the steps to run, known ones first, then unknown scripts."""
    steps = [(name, [str(HERE / script), *(quick_args if quick else full_args)])
             for name, (script, full_args, quick_args) in STEPS.items()]
    known = {script for script, _, _ in STEPS.values()} | {Path(__file__).name}
    for extra in sorted(p for p in HERE.glob("*.py")
                        if p.name not in known | NOT_BENCHMARKS and not p.name.startswith("_")):
        logger.warning("%s is not in run_all.STEPS: running it with its defaults (no quick settings known)", extra.name)
        steps.append((extra.stem, [str(extra)]))
    if only:
        unknown = sorted(set(only) - {n for n, _ in steps})
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {[n for n, _ in steps]}")
        steps = [s for s in steps if s[0] in only]
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md", help="document to rewrite")
    parser.add_argument("--quick", action="store_true", help="small settings: a smoke run, not figures to publish")
    parser.add_argument("--only", nargs="+", default=None, help=f"run only these ({', '.join(STEPS)})")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    header = machine_header()
    steps = plan(args.quick, args.only)
    failed = []
    for name, argv in steps:
        # relative: the scripts quote their command line in the document, which must not name this machine's folders
        cmd = [sys.executable, *argv, "--write-docs", os.path.relpath(args.docs)]
        if args.dry_run:
            print(" ".join(repr(c) if c == "" else c for c in cmd))
            continue
        logger.info("%s: %s", name, " ".join(cmd[1:]))
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode:
            failed.append(name)
            logger.error("%s failed (exit %d) after %.0f s; its section was left as it was", name, proc.returncode,
                         time.perf_counter() - t)
        else:
            logger.info("%s done in %.0f s", name, time.perf_counter() - t)
    if args.dry_run:
        return 0
    write_header(args.docs, header)
    logger.info("%s: header and %d section(s) written; failed: %s", args.docs, len(steps) - len(failed),
                ", ".join(failed) or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
