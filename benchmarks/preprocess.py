"""Benchmark: covidctnet preprocessing against a reference that follows the official CovidCTNet code.

Each (case, implementation) runs in its own subprocess so that peak RSS is measured separately. The reference follows
the official approach (pydicom stack sorted by ImagePositionPatient, HU int16, ``scipy.ndimage.zoom`` to 1 mm with its
default cubic spline, per-slice ``skimage.transform.resize``) but with our default output contract (HU clipped to
[-1000, 400], 240×240), so the mean absolute difference compares implementations, not definitions.

``--whole-process`` times what a user runs instead: ``covidctnet preprocess SERIES -o OUT`` as a fresh process per
full series of ``ct-dicom-full`` (imports, DICOM decoding, writing the ``.nii.gz`` included), and one command over
all of them (a batch), each side by side with the reference run the same way (a fresh Python process that imports
pydicom, SciPy and scikit-image, reads the series, resamples and ``np.save``s the result), alternating, with the
peak RSS of each process from ``wait4``.

Usage::

    python benchmarks/preprocess.py [--data ../shared/data] [--repeats 3] [--write-docs docs/benchmarks.md]
    python benchmarks/preprocess.py --whole-process [--repeats 3] [--write-docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Preprocessing"


def _reference(stack_hu: np.ndarray, spacing_zyx: np.ndarray, size: int) -> np.ndarray:
    from scipy import ndimage
    from skimage.transform import resize

    new_shape = np.round(stack_hu.shape * spacing_zyx)
    resampled = ndimage.zoom(stack_hu, new_shape / stack_hu.shape, mode="nearest")
    norm = (np.clip(resampled, -1000, 400) + 1000.0) / 1400.0
    return np.stack([resize(s, (size, size), anti_aliasing=True) for s in norm])


def _read_reference_dicom(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    slices = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    slices.sort(key=lambda s: float(s.ImagePositionPatient[2]))
    image = np.stack([s.pixel_array for s in slices]).astype(np.int16)
    for n, s in enumerate(slices):
        image[n] = (image[n] * float(s.RescaleSlope) + float(s.RescaleIntercept)).astype(np.int16)
    dz = abs(float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2]))
    return image, np.array([dz, *map(float, slices[0].PixelSpacing)])


def _synthetic(depth: int) -> tuple[np.ndarray, np.ndarray]:
    """A 512×512×depth HU volume with body, lungs, bone and noise (int16, (z, y, x))."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) / 200) ** 2 + ((xx - 256) / 240) ** 2 < 1
    lungs = (((yy - 240) / 130) ** 2 + ((xx - 160) / 70) ** 2 < 1) | (((yy - 240) / 130) ** 2 + ((xx - 352) / 70) ** 2 < 1)
    spine = ((yy - 400) / 25) ** 2 + ((xx - 256) / 25) ** 2 < 1
    sl = np.full((512, 512), -1024, np.int16)
    sl[body] = 40
    sl[lungs] = -850
    sl[spine] = 900
    vol = np.repeat(sl[None], depth, axis=0)
    vol += rng.normal(0, 20, size=(1, 512, 512)).astype(np.int16)
    return vol, np.array([1.0, 0.7, 0.7])


def _warm_up(impl: str) -> None:
    """Import and run each implementation once on a tiny volume, so the timing is per scan, not start-up."""
    import pydicom  # noqa: F401  (both read DICOM with pydicom headers)

    if impl == "reference":
        _reference(np.full((4, 32, 32), -500, np.int16), np.array([2.0, 0.7, 0.7]), 16)
    else:
        import SimpleITK  # noqa: F401

        from covidctnet.io.volume import Volume
        from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_volume

        preprocess_volume(Volume(np.full((32, 32, 4), -500, np.float32), np.eye(4), Path("warm")), PreprocessConfig(size_xy=16))


def run_one(case: str, impl: str, data: Path, out: Path) -> dict:
    """Run one implementation on one case in THIS process; returns seconds, peak RSS and the RSS after warm-up."""
    _warm_up(impl)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if impl == "reference":
        if case.startswith("synthetic"):
            stack, spacing = _synthetic(int(case.split("-")[1]))
        else:
            stack, spacing = _read_reference_dicom(data / "ct-dicom" / case)
        result = _reference(stack, spacing, 240).astype(np.float32)  # (z, y, x) = official layout
    else:
        from covidctnet.io.volume import Volume, read_volume
        from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_volume, ras_to_official_layout

        if case.startswith("synthetic"):
            stack, spacing = _synthetic(int(case.split("-")[1]))
            array = np.ascontiguousarray(stack.transpose(2, 1, 0), dtype=np.float32)  # (x, y, z), LPS axes
            del stack
            affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
            volume = Volume(array, affine, Path(case))
        else:
            volume = read_volume(data / "ct-dicom" / case)
        arr, _ = preprocess_volume(volume, PreprocessConfig())
        result = ras_to_official_layout(arr)
    seconds = time.perf_counter() - t0
    np.save(out, result)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "startup_rss_mb": base_rss}


def _child(case: str, impl: str, data: Path, out: Path) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, %r); from preprocess import run_one; from pathlib import Path; "
        "print(json.dumps(run_one(%r, %r, Path(%r), Path(%r))))" % (str(Path(__file__).parent), case, impl, str(data), str(out))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


WHOLE_SECTION = "## Preprocessing, whole process"


def reference_main(out_dir: Path, series: list[Path]) -> None:
    """The reference as a program: each series read, resampled and saved as ``<name>.npy`` (official style)."""
    for folder in series:
        stack, spacing = _read_reference_dicom(folder)
        np.save(out_dir / f"{folder.name}.npy", _reference(stack, spacing, 240).astype(np.float32))


def _timed(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system, all threads) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def whole_process(data: Path, repeats: int) -> str:
    """Time ``covidctnet preprocess`` and the reference as whole processes (see the module docstring)."""
    series = sorted(p for p in (data / "ct-dicom-full").iterdir() if p.is_dir())
    ours = lambda out, dirs: [sys.executable, "-m", "covidctnet", "preprocess", *map(str, dirs), "-o", str(out),  # noqa: E731
                              "-q", "--no-resume"]
    ref = lambda out, dirs: [sys.executable, str(Path(__file__)), "--reference", str(out), *map(str, dirs)]  # noqa: E731
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(s.name, [s]) for s in series] + [(f"batch of {len(series)}", series)]
        for name, dirs in cases:
            times: dict[str, list[tuple[float, float, float]]] = {"reference": [], "ours": []}
            for r in range(repeats):
                for impl, make in (("reference", ref), ("ours", ours)):
                    out = Path(tmp) / f"{name}-{impl}{r}".replace(" ", "_")
                    out.mkdir()
                    times[impl].append(_timed(make(out, dirs)))
            med = {k: float(np.median([t for t, _, _ in v])) for k, v in times.items()}
            rss = {k: max(m for _, m, _ in v) for k, v in times.items()}
            cpu = {k: float(np.median([c for _, _, c in v])) for k, v in times.items()}
            rows.append((name, len(dirs), med, rss, cpu))
            print(name, med, rss, cpu, flush=True)
    load1 = os.getloadavg()[0]
    lines = [
        WHOLE_SECTION, "",
        f"`python benchmarks/preprocess.py --whole-process --repeats {repeats}` on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPUs, load average {load0:.1f} at the start and {load1:.1f} at the end. Each figure is "
        "the median wall time of a fresh process, the two implementations alternating: `covidctnet preprocess "
        "SERIES… -o OUT --no-resume` (240×240, 1 mm, `.nii.gz`) against the reference program (pydicom, cubic "
        "`scipy.ndimage.zoom` to 1 mm, HU window, per-slice `skimage` resize to 240×240, `np.save`). Series: the "
        "full shared series of `ct-dicom-full`; the batch row is one process for all of them. CPU s is user + "
        "system time of the process (all threads), which depends far less on the machine's load than wall time.", "",
        "| series | slices | reference s | ours s | speed-up (wall) | reference CPU s | ours CPU s | speed-up (CPU) "
        "| reference peak RSS MB | ours peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, med, rss, cpu in rows:
        slices = sum(len(list(d.glob("*.dcm"))) for d in (series if n > 1 else [data / "ct-dicom-full" / name]))
        lines.append(f"| {name} | {slices} | {med['reference']:.2f} | {med['ours']:.2f} | "
                     f"{med['reference'] / med['ours']:.1f}× | {cpu['reference']:.1f} | {cpu['ours']:.1f} | "
                     f"{cpu['reference'] / cpu['ours']:.1f}× | {rss['reference']:.0f} | {rss['ours']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--reference":
        reference_main(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole-process", action="store_true", help="time whole commands (see the docstring)")
    parser.add_argument("--cases", nargs="*", default=["covid-P001", "cap-cap001", "control-normal001", "synthetic-300"])
    parser.add_argument("--memory-case", default="synthetic-600", help="case run with ours only, for peak RSS")
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args()
    if args.whole_process:
        text = whole_process(args.data, args.repeats)
        print(text)
        if args.write_docs:
            from _docs import replace_section

            replace_section(args.write_docs, WHOLE_SECTION, text)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            res = {}
            for impl in ("reference", "ours"):
                runs = [_child(case, impl, args.data, Path(tmp) / f"{impl}.npy") for _ in range(args.repeats)]
                res[impl] = {
                    "seconds": float(np.median([r["seconds"] for r in runs])),
                    "peak_rss_mb": float(max(r["peak_rss_mb"] for r in runs)),
                    "startup_rss_mb": float(max(r["startup_rss_mb"] for r in runs)),
                }
            a, b = np.load(Path(tmp) / "reference.npy"), np.load(Path(tmp) / "ours.npy")
            if a.shape[0] != b.shape[0]:
                # The official zoom gives round(n * spacing) slices (not exactly 1 mm apart); ours are 1 mm apart.
                # Both grids are corner-aligned on the first and last slice, so a linear zoom along z aligns them.
                from scipy import ndimage

                a = ndimage.zoom(a, (b.shape[0] / a.shape[0], 1, 1), order=1)
            mad = float(np.mean(np.abs(a - b)))
            rows.append((case, res, mad, a.shape, b.shape))
            print(case, json.dumps(res), "MAD", mad, a.shape, b.shape, flush=True)
        mem = _child(args.memory_case, "ours", args.data, Path(tmp) / "mem.npy") if args.memory_case else None

    lines = [
        SECTION,
        "",
        f"`python benchmarks/preprocess.py --repeats {args.repeats}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "Seconds are the median of the repeats and include reading the DICOM files (not for the synthetic case, "
        "which starts from an in-memory HU array); peak RSS is the largest of the repeats' subprocesses.",
        "The reference follows the official CovidCTNet code (pydicom stack, cubic `scipy.ndimage.zoom` to 1 mm, "
        "per-slice `skimage` resize) with our default output contract (clip to [-1000, 400] HU, 240×240); "
        "MAD is the mean absolute difference of the two [0, 1] outputs.",
        "",
        "| case | reference s | ours s | speed-up | reference peak RSS MB (after imports) "
        "| ours peak RSS MB (after imports) | MAD |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, res, mad, *_ in rows:
        r, o = res["reference"], res["ours"]
        lines.append(
            f"| {case} | {r['seconds']:.2f} | {o['seconds']:.2f} | {r['seconds'] / o['seconds']:.1f}× | "
            f"{r['peak_rss_mb']:.0f} ({r['startup_rss_mb']:.0f}) | {o['peak_rss_mb']:.0f} ({o['startup_rss_mb']:.0f}) "
            f"| {mad:.4f} |"
        )
    if mem:
        lines += ["", f"Memory bound: ours on {args.memory_case} (512×512×600, 0.7 mm in-plane) took "
                      f"{mem['seconds']:.1f} s with a peak RSS of {mem['peak_rss_mb']:.0f} MB (target ≤ 3072 MB)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        from _docs import replace_section

        replace_section(args.write_docs, SECTION, text)



if __name__ == "__main__":
    main()
