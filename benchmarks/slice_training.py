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
    train_times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        idx = range(step * batch, (step + 1) * batch)
        items = [ds[i] for i in idx]
        x = torch.stack([it["image"] for it in items])
        y = torch.stack([it["label"] for it in items])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step >= warmup:
            train_times.append(time.perf_counter() - t0)
    model.eval()
    plain = SliceDataset(records[:batch], size, lung_mask, cache=ds.cache[:batch])
    x = torch.stack([plain[i]["image"] for i in range(batch)])
    pred_times = []
    with torch.no_grad():
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            model(x)
            if step >= warmup:
                pred_times.append(time.perf_counter() - t0)
    return {
        "arch": arch, "width": width, "size": size, "lung_mask": lung_mask,
        "params": sum(p.numel() for p in model.parameters()),
        "train_ips": batch / statistics.median(train_times),
        "predict_ips": batch / statistics.median(pred_times),
    }


def render(results: list[dict], args: argparse.Namespace, load_start: tuple, load_end: tuple) -> str:
    import torch

    lines = [
        SECTION,
        "",
        f"`nice -n 15 .venv/bin/python benchmarks/slice_training.py --batch {args.batch} --warmup {args.warmup} "
        f"--steps {args.steps}`: a training step = {args.batch} real UCSD training images through the `train-slice` "
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
        "| arch | width | input (px) | lung-mask channel | parameters | training images/s | prediction images/s |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['arch']} | {r['width']} | {r['size']} | {'yes' if r['lung_mask'] else 'no'} | "
                     f"{r['params']:,} | {r['train_ips']:.1f} | {r['predict_ips']:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    from covidctnet.utils import atomic_write_text

    atomic_write_text(doc, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                        / "covid-ct-2d")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()
    load_start = os.getloadavg()
    results = []
    for arch, width, size, mask in CASES:
        r = measure(args.data, arch, width, size, mask, args.batch, args.warmup, args.steps)
        print(r, file=sys.stderr, flush=True)
        results.append(r)
    section = render(results, args, load_start, os.getloadavg())
    print(section)
    if args.write_docs:
        write_section(args.write_docs, section)


if __name__ == "__main__":
    main()
