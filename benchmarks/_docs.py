"""Shared by the benchmark scripts: the CPU model, and writing one section of ``docs/benchmarks.md`` while keeping
every other section as it is."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def replace_section(doc: Path, heading: str, text: str) -> None:
    """Replace the section that starts with the line ``heading`` (e.g. ``## Perlin noise``) up to the next ``## ``
    heading by ``text`` (which starts with that heading), or append it; the file is written atomically."""
    from covidctnet.core.files import atomic_write_text

    doc = Path(doc)
    lines = doc.read_text().splitlines() if doc.exists() else ["# Benchmarks"]
    start = next((i for i, line in enumerate(lines) if line.strip() == heading.strip()), None)
    if start is None:
        before, after = lines, []
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        before, after = lines[:start], lines[end:]
    parts = ["\n".join(before).rstrip("\n"), text.strip("\n")] + (["\n".join(after)] if after else [])
    atomic_write_text(doc, "\n\n".join(p for p in parts if p) + "\n")
