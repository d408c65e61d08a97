"""Slice-model throughput on CPU: training images/s (real UCSD images, augmentation, forward, backward, Adam) and
prediction images/s, per architecture and input size.

Training steps draw batches from :class:`covidctnet.data.ucsd.SliceDataset` with the ``train-slice`` augmentation, so
the figure includes the data pipeline (images are cached in memory as in training). Prediction is a no-grad forward
pass of already prepared images. Medians over the timed steps after warm-up steps. Optionally writes the
``## Slice model`` section of ``docs/benchmarks.md`` (only that section is replaced).

Usage::

    nice -n 15 .venv/bin/python benchmarks/slice_training.py                 # print a table
    nice -n 15 .venv/bin/python benchmarks/slice_training.py --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SECTION = "## Slice model"
CASES = [  # (arch, width, size, lung_mask)
    ("resnet18", 0.25, 128, False),
    ("resnet18", 0.25, 128, True),
    ("resnet18", 0.5, 160, False),
    ("resnet18", 1.0, 224, False),
    ("densenet121", 1.0, 224, False),
]


def measure(data: Path, arch: str, width: float, size: int, lung_mask: bool, batch: int, warmup: int,
            steps: int) -> dict:
    import torch

    from covidctnet.data.ucsd import SliceDataset, build_slice_transforms, find_records
    from covidctnet.models.slice import build_slice_model

    torch.manual_seed(0)
    records = find_records(data, "train")[: batch * (warmup + steps)]
    ds = SliceDataset(records, size, lung_mask, build_slice_transforms(True, size, lung_mask), seed=0)
    model = build_slice_model(arch, in_channels=2 if lung_mask else 1, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    train_times, train_cpu = [], []
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = range(step * batch, (step + 1) * batch)
        items = [ds[i] for i in idx]
        x = torch.stack([it["image"] for it in items])
        y = torch.stack([it["label"] for it in items])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step >= warmup:
            train_times.append(time.perf_counter() - t0)
            train_cpu.append(time.process_time() - c0)
    model.eval()
    plain = SliceDataset(records[:batch], size, lung_mask, cache=ds.cache[:batch])
    x = torch.stack([plain[i]["image"] for i in range(batch)])
    pred_times, pred_cpu = [], []
    with torch.no_grad():
        for step in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            model(x)
            if step >= warmup:
                pred_times.append(time.perf_counter() - t0)
                pred_cpu.append(time.process_time() - c0)
    return {
        "arch": arch, "width": width, "size": size, "lung_mask": lung_mask,
        "params": sum(p.numel() for p in model.parameters()),
        "train_ips": batch / statistics.median(train_times),
        "train_ips_cpu": batch / statistics.median(train_cpu),
        "predict_ips": batch / statistics.median(pred_times),
        "predict_ips_cpu": batch / statistics.median(pred_cpu),
    }


def render(results: list[dict], args: argparse.Namespace, load_start: tuple, load_end: tuple) -> str:
    import torch

    lines = [
        SECTION,
        "",
        f"`python benchmarks/slice_training.py --batch {args.batch} --warmup {args.warmup} --steps {args.steps} "
        f"--threads {args.threads}`: a training step = {args.batch} real UCSD training images through the `train-slice` "
        "augmentation (random resized crop, flip, rotation, intensity jitter; images pre-cached as in training) + "
        "forward + cross-entropy + backward + Adam; prediction = a no-grad forward pass of the same batch. "
        "Medians over the timed steps after warm-up, CPU float32.",
        "",
        f"- Date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; nproc {os.cpu_count()}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); Python {platform.python_version()}",
        f"- Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{', '.join(f'{x:.2f}' for x in load_end)}, on {os.cpu_count()} cores"
        + (": above the core count, other jobs shared the CPU, so these are lower bounds for an idle machine"
           if max(load_start[0], load_end[0]) > (os.cpu_count() or 1) else ""),
        "",
        "| arch | width | input (px) | lung-mask channel | parameters | training images/s (wall) | "
        "training images per CPU-s | prediction images/s (wall) | prediction images per CPU-s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['arch']} | {r['width']} | {r['size']} | {'yes' if r['lung_mask'] else 'no'} | "
                     f"{r['params']:,} | {r['train_ips']:.1f} | {r['train_ips_cpu']:.1f} | {r['predict_ips']:.1f} | "
                     f"{r['predict_ips_cpu']:.1f} |")
    return "\n".join(lines) + "\n"


def runs_table(runs: list[Path]) -> str:
    """Median epoch time of real ``train-slice`` runs (their ``metrics.csv`` and ``config.yaml``)."""
    import csv

    import yaml

    if not runs:
        return ""
    from covidctnet.data.ucsd import find_records

    lines = [
        "",
        "Real `train-slice` runs (one epoch = the training split plus a validation pass; one thread per run, "
        "`nice -n 15`, two runs at a time next to other jobs on the 2 cores):",
        "",
        "| run | arch, width, input | lung mask | train / val images | epochs | median epoch (s) | fastest epoch (s) | "
        "training images/s at the fastest |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        data = Path(yaml.safe_load((run / "model" / "config.yaml").read_text())["training"]["data"])
        data = data if data.is_absolute() else Path(__file__).resolve().parents[1] / data
        n_train, n_val = len(find_records(data, "train")), len(find_records(data, "val"))
        secs = sorted(float(r["seconds"]) for r in rows)
        lines.append(f"| {run.name} | {cfg['arch']} ×{cfg['width']}, {cfg['size']} px | "
                     f"{'yes' if cfg['lung_mask'] else 'no'} | {n_train} / {n_val} | {len(rows)} | "
                     f"{statistics.median(secs):.1f} | {secs[0]:.1f} | {n_train / secs[0]:.0f} |")
    return "\n".join(lines) + "\n"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                        / "covid-ct-2d")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per-core figures)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[],
                        help="train-slice run folders whose metrics.csv epoch times are summarised too")
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    results = []
    for arch, width, size, mask in CASES:
        r = measure(args.data, arch, width, size, mask, args.batch, args.warmup, args.steps)
        print(r, file=sys.stderr, flush=True)
        results.append(r)
    section = render(results, args, load_start, os.getloadavg()) + runs_table(args.runs)
    print(section)
    if args.write_docs:
        from _docs import replace_section

        replace_section(args.write_docs, SECTION, section)


if __name__ == "__main__":
    main()
