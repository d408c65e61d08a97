"""BCDU-Net training throughput on CPU: forward + backward + Adam step at 240x240, per base width.

Each width runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own. Reports the median
samples/s over the timed steps (after warm-up steps), and optionally writes the ``## BCDU-Net training throughput``
section of ``docs/benchmarks.md`` (only that section is replaced; other sections are kept as they are).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bcdunet.py                       # print a table
    nice -n 10 .venv/bin/python benchmarks/bcdunet.py --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _docs import cpu_model  # benchmarks/_docs.py

SECTION = "## BCDU-Net training throughput"


def run_one(width: int, batch: int, size: int, warmup: int, steps: int, dense_blocks: int, seed: int) -> dict:
    """Time ``steps`` training steps of BCDUNet(features=width) on random (batch, 1, size, size) inputs."""
    import torch

    from covidctnet.models.bcdunet import BCDUNet, keras_param_count

    torch.manual_seed(seed)
    net = BCDUNet(features=width, dense_blocks=dense_blocks).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)  # the official optimiser
    loss_fn = torch.nn.BCELoss()  # the official loss
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 1, size, size, generator=g)
    noisy = target.clone()
    noisy[: batch // 2] += 0.1 * torch.randn(batch // 2, 1, size, size, generator=g)  # half noised, as in training
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(noisy), target)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    med = statistics.median(times)
    # ru_maxrss is KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "width": width,
        "dense_blocks": dense_blocks,
        "params_keras": keras_param_count(net),
        "batch": batch,
        "size": size,
        "steps": steps,
        "median_step_s": med,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "samples_per_s": batch / med,
        "peak_rss_mib": rss / 2**20,
        "loss": float(loss),
        "threads": torch.get_num_threads(),
    }


def _environment() -> dict:
    import torch

    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _markdown(env: dict, rows: list[dict], cmd: str) -> str:
    load = ", ".join(f"{x:.2f}" for x in env["load"]) if env.get("load") else "n/a"
    lines = [
        SECTION,
        "",
        f"`nice -n 10 {cmd}`. One training step = forward + BCE loss + backward + Adam step of",
        (
            f"`BCDUNet(features=w, dense_blocks={rows[0]['dense_blocks']})` in train mode on random "
            f"{rows[0]['size']}×{rows[0]['size']} slices, batch {rows[0]['batch']} (half noised), CPU float32; median "
            f"of {rows[0]['steps']} timed steps after warm-up. Each width runs in its own process; peak RSS is that "
            "process's `ru_maxrss` (model + optimiser + activations + Python/torch)."
        ),
        "",
        (
            f"- Date: {env['date']}; nproc {env['nproc']}; CPU: {env['cpu']}; torch {env['torch']} "
            f"({env['threads']} threads); Python {env['python']}"
        ),
        (
            f"- Load average (1, 5, 15 min) when the run started: {load}, on {env['nproc']} cores; a load above the "
            "core count means other jobs shared the CPU, so the figures are then lower bounds for an idle machine"
        ),
        "",
        "| base width | parameters (Keras count) | median step (s) | min–max step (s) | samples/s | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['params_keras']:,} | {r['median_step_s']:.2f} | "
            f"{r['min_step_s']:.2f}–{r['max_step_s']:.2f} | {r['samples_per_s']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--batch", type=int, default=5, help="slices per step (official: 5)")
    p.add_argument("--size", type=int, default=240, help="slice height and width in pixels")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per width")
    p.add_argument("--dense-blocks", type=int, default=3, choices=(1, 3))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-docs", type=Path, default=None, help="markdown file whose section to (re)write")
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child is not None:
        res = run_one(args._child, args.batch, args.size, args.warmup, args.steps, args.dense_blocks, args.seed)
        print(json.dumps(res))
        return 0

    env = _environment()
    rows = []
    for w in args.widths:
        cmd = [sys.executable, __file__, "--_child", str(w), "--batch", str(args.batch), "--size", str(args.size),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--dense-blocks", str(args.dense_blocks),
               "--seed", str(args.seed)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"width {w:3d}: {row['samples_per_s']:.2f} samples/s (median step {row['median_step_s']:.2f} s), "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    shown = " ".join(["python benchmarks/bcdunet.py", *(argv if argv is not None else sys.argv[1:])]).strip()
    md = _markdown(env, rows, shown)
    if args.write_docs:
        from _docs import replace_section

        replace_section(args.write_docs, SECTION, md)
        print(f"wrote {SECTION!r} in {args.write_docs}")
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
