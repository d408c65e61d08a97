"""Benchmark (issue 15, item 3): how to compress the preprocessed ``.nii.gz``, the largest single cost of a whole
``covidctnet preprocess`` run before ISA-L.

One full shared series is preprocessed (240×240, 1 mm), the float32 NIfTI bytes are compressed as one gzip stream, on
one thread, by zlib (what nibabel uses), ISA-L (``isal``, what ``write_nifti`` uses) and, when installed, zlib-ng
at low levels, and read back with zlib (what every viewer uses); the uint16 alternative the issue names (values ×
65535 with ``scl_slope`` 1/65535) is measured too. Seconds are the best of ``--repeats``.

Usage::

    python benchmarks/nifti_compression.py [--data ../shared/data] [--series cap-cap001] [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import time
import zlib
from pathlib import Path

import numpy as np
from _docs import cpu_model, replace_section  # benchmarks/ is on sys.path when a script in it runs

SECTION = "## Preprocessing output: compression (issue 15)"


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--series", default="cap-cap001")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()

    import nibabel as nib
    from isal import isal_zlib

    try:  # not a dependency of covidctnet: pip install zlib-ng to compare it too
        from zlib_ng import zlib_ng
    except ImportError:
        zlib_ng = None

    from covidctnet.io.volume import read_volume
    from covidctnet.preprocessing.preprocess import preprocess_volume

    array, affine = preprocess_volume(read_volume(args.data / "ct-dicom-full" / args.series))
    raw = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine).to_bytes()
    img16 = nib.Nifti1Image(np.round(array * 65535).astype(np.uint16), affine)
    img16.header.set_slope_inter(1 / 65535, 0)
    raw16 = img16.to_bytes()
    load = os.getloadavg()[0]
    rows = []
    cases = [("float32", "zlib", zlib, 1), ("float32", "ISA-L", isal_zlib, 0), ("float32", "ISA-L", isal_zlib, 1),
             ("float32", "ISA-L", isal_zlib, 2), ("float32", "zlib-ng", zlib_ng, 1), ("float32", "zlib-ng", zlib_ng, 2),
             ("uint16 + scl_slope", "zlib", zlib, 1), ("uint16 + scl_slope", "ISA-L", isal_zlib, 1)]
    cases = [c for c in cases if c[2] is not None]
    for dtype, name, mod, level in cases:
        data = raw if dtype == "float32" else raw16

        def pack(mod=mod, level=level, data=data):
            packer = mod.compressobj(level, mod.DEFLATED, 31)
            return packer.compress(data) + packer.flush()

        seconds, packed = _best(pack, args.repeats)
        read, unpacked = _best(lambda packed=packed: zlib.decompress(packed, 31), args.repeats)
        assert unpacked == data
        rows.append((dtype, name, level, seconds, len(packed) / 1e6, read))
        print(rows[-1], flush=True)
    err16 = float(np.abs(np.round(array * 65535) / 65535 - array).max())
    lines = [
        SECTION, "",
        (f"`python benchmarks/nifti_compression.py --series {args.series}` on {time.strftime('%Y-%m-%d')}, "
         f"{cpu_model()}, load average {load:.2f}. The preprocessed {args.series} ({'×'.join(map(str, array.shape))}, "
         f"{len(raw) / 1e6:.1f} MB as a float32 NIfTI) compressed as one gzip stream on one thread (best of "
         f"{args.repeats}), and read back with zlib. `write_nifti` uses ISA-L level 1, cut into one gzip member per "
         f"core. The uint16 file (values × 65535, `scl_slope` 1/65535) is half the size but changes values by up to "
         f"{err16:.1e}; kept float32, exact."), "",
        "| data | compressor | level | compress s | MB | read (zlib) s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {d} | {n} | {lv} | {s:.3f} | {mb:.1f} | {r:.3f} |" for d, n, lv, s, mb, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        replace_section(args.write_docs, SECTION, text)


if __name__ == "__main__":
    main()
