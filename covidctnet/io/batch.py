"""Running one pipeline stage over many studies: discovery, manifest, resume, worker processes.

Every batch stage (``preprocess``, ``residuals``, ``predict``) goes through :func:`run_batch`:

* studies are found from files, DICOM folders or dataset roots (the MosMed ``studies/CT-k/`` layout gives labels);
* each study is processed by a picklable function in the main process (``workers=0``) or in worker processes; an
  error in one study is caught where it happens and recorded as ``status=error`` with a one-line message, and the
  batch goes on;
* outputs are written atomically by the stage, and ``manifest.csv`` is rewritten atomically after every study, so a
  run killed at any moment leaves only complete files, and re-running skips the studies already ``ok`` whose output
  still has the recorded sha256.

``manifest.csv`` columns: ``study_id, source, label, status, error, output, sha256`` followed by the stage's own
columns. ``source`` is relative to the input root. No DICOM patient tag ever enters it: the study id is the file or
folder name.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from covidctnet.core.errors import CovidCTNetError, InputError, LabelError
from covidctnet.core.files import remove_stale_temps, sha256_file, write_csv
from covidctnet.core.labels import normalize_label
from covidctnet.core.progress import progress, progress_task
from covidctnet.io.dicomweb import RemoteStudy, find_studies, is_dicomweb_url, retrieved, transfer_config_of
from covidctnet.io.volume import is_volume_file, study_id_from_path

__all__ = [
    "MANIFEST_NAME",
    "Study",
    "BatchSummary",
    "BASE_COLUMNS",
    "discover_studies",
    "read_manifest",
    "run_batch",
]

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("study_id", "source", "label", "status", "error", "output", "sha256")
MANIFEST_NAME = "manifest.csv"


@dataclass(frozen=True)
class Study:
    """One study to process.

    Attributes:
        study_id: file or folder name (``study_0001``), unique within a batch.
        path: the NIfTI/NRRD file or DICOM folder.
        source: ``path`` relative to the input root it was found under (for the manifest).
        label: canonical label when the layout tells it (MosMed ``CT-k`` folders, ``control/covid/cap`` folders).
        remote: a study on a DICOMweb server: retrieved into a folder just before the stage runs on it
            (``path`` is then that folder; ``source`` the URL without credentials).
    """
    study_id: str
    path: Path
    source: str
    label: str | None = None
    remote: RemoteStudy | None = None


@dataclass
class BatchSummary:
    """What a batch did. ``rows`` are the manifest rows of this run's studies, in input order."""

    n_ok: int = 0
    n_failed: int = 0
    n_skipped: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    manifest: Path | None = None

    @property
    def errors(self) -> list[str]:
        return [f"{r['study_id']}: {r['error']}" for r in self.rows if r["status"] == "error"]


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_folder(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return any(_looks_like_dicom(p) for p in files[:8]) or (not files and not any(folder.iterdir()))


def _label_from_parts(parts: Sequence[str]) -> str | None:
    for part in reversed(parts):
        if part.isdigit():  # a folder called "1" is a patient number, not a class
            continue
        try:
            return normalize_label(part)
        except LabelError:
            continue
    return None


def discover_studies(inputs: Iterable[str | os.PathLike]) -> list[Study]:
    """Find the studies in files, DICOM folders and dataset roots.

    A file is one study; a folder with DICOM files (or an empty folder, which then fails with a clear error) is one
    study; any other folder is searched recursively for volume files and DICOM folders. Labels come from the folder
    names between the root and the study (``CT-0`` → control, ``CT-1``…``CT-4`` → covid, ``control``/``covid``/``cap``).
    A ``dicomweb+http(s)://`` URL (or a :class:`~covidctnet.io.dicomweb.RemoteInput`, which carries the transfer
    settings) is one study per :func:`~covidctnet.io.dicomweb.find_studies`, retrieved when it is processed.

    Raises:
        InputError: an input path does not exist, or a dataset folder holds no study at all.
    """
    studies: list[Study] = []
    for raw in inputs:
        if is_dicomweb_url(raw):
            studies.extend(Study(r.study_id, Path(r.study_id), r.display, remote=r)
                           for r in find_studies(os.fspath(raw), transfer_config_of(raw)))
            continue
        root = Path(raw)
        if not root.exists():
            raise InputError(f"{root}: no such file or folder")
        if root.is_file() or _is_dicom_folder(root):
            studies.append(Study(study_id_from_path(root), root, root.name, _label_from_parts(root.parts[-2:-1])))
            continue
        found: list[Study] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            rel_parts = here.relative_to(root).parts
            if here != root and _is_dicom_folder(here) and filenames:
                found.append(Study(here.name, here, str(here.relative_to(root)), _label_from_parts(rel_parts[:-1])))
                dirnames[:] = []
                continue
            for name in sorted(filenames):
                p = here / name
                if is_volume_file(p):
                    found.append(
                        Study(study_id_from_path(p), p, str(p.relative_to(root)), _label_from_parts(rel_parts))
                    )
        if not found:
            raise InputError(f"{root}: no NIfTI/NRRD files or DICOM series found in this folder")
        studies.extend(found)
    return studies


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``manifest.csv`` (empty list if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_manifest(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    write_csv(path, columns, [{c: "" if row.get(c) is None else row.get(c) for c in columns}
                              for row in sorted(rows, key=lambda r: r["study_id"])])


def _error_row(study: Study, err: BaseException, local: Path | None = None) -> dict[str, Any]:
    message = " ".join(str(err).split()) or type(err).__name__
    if study.remote is not None:  # a retrieved study is named by its URL, not by the temporary folder it was read from
        if local is not None:
            message = message.replace(str(local), study.remote.display)
        study = replace(study, path=study.remote.display)  # type: ignore[arg-type]
    if not isinstance(err, CovidCTNetError):
        message = f"{study.path}: {type(err).__name__}: {message}"
    elif str(study.path) not in message:
        # raised deep down (e.g. by a network) without knowing the file: the one-line error must still name the study
        message = f"{study.path}: {message}"
    return {"status": "error", "error": message, "output": "", "sha256": ""}


def _study_columns(study: Study) -> dict[str, Any]:
    """The manifest columns that name a study: ``study_id``, ``source`` and ``label`` (empty when unknown)."""
    return {"study_id": study.study_id, "source": study.source, "label": study.label or ""}


def _failed_row(study: Study, err: BaseException) -> dict[str, Any]:
    """The whole manifest row of a study that failed before or around its processing (a duplicate id, a lost
    worker)."""
    return {**_study_columns(study), **_error_row(study, err)}


def _run_one(fn: Callable[[Study, Path], dict[str, Any]], study: Study, out_dir: Path) -> dict[str, Any]:
    """Process one study, turning any exception into an error row (runs in the worker)."""
    row = _study_columns(study)
    local = None
    try:
        if study.remote is not None:
            with retrieved(study.remote) as local:  # deleted afterwards unless --keep-download
                result = fn(replace(study, path=local), out_dir)
        else:
            result = fn(study, out_dir)
        row.update(result)
        row.setdefault("status", "ok")
        row.setdefault("error", "")
        if row.get("output"):
            row["sha256"] = sha256_file(out_dir / row["output"])
    except MemoryError:
        row.update(_error_row(study, InputError(f"{study.path}: out of memory while processing this study")))
    except Exception as err:  # noqa: BLE001 - one bad study must never stop the batch; the message is recorded
        logger.debug("study %s failed", study.study_id, exc_info=True)
        row.update(_error_row(study, err, local))
    return row


def _init_worker(threads: int) -> None:
    # the main process shows the batch's progress; bars of several workers on one terminal would overwrite each other
    os.environ["COVIDCTNET_NO_PROGRESS"] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)  # BLAS (preprocessing's resampling) as well as torch: N workers share the cores
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass


def run_batch(
    studies: Sequence[Study],
    out_dir: str | os.PathLike,
    fn: Callable[[Study, Path], dict[str, Any]],
    columns: Sequence[str] = (),
    *,
    resume: bool = True,
    workers: int = 0,
    desc: str = "studies",
    on_result: Callable[[dict[str, Any]], None] | None = None,
    manifest_name: str | None = MANIFEST_NAME,
    scheduler: str | None = None,
) -> BatchSummary:
    """Run ``fn(study, out_dir)`` for every study and keep ``out_dir/manifest.csv`` up to date.

    Args:
        studies: from :func:`discover_studies`; ids must be unique (a repeated id is recorded as an error).
        out_dir: output folder; created if needed.
        fn: a picklable top-level function (or ``functools.partial``) that writes the study's output atomically
            and returns the row's stage columns, including ``output`` (file name relative to ``out_dir``).
        columns: the stage's own manifest columns, after :data:`BASE_COLUMNS`.
        resume: skip studies whose manifest row is ``ok`` and whose output still has the recorded sha256.
        workers: 0 runs inline in this process (best for debugging); N > 0 uses N spawned worker processes.
        desc: label of the progress bar (a terminal) or of the progress lines in the log (count, elapsed, ETA).
        on_result: called in the main process with each finished row (e.g. to print errors as they happen).
        scheduler: address of a Dask distributed scheduler (``tcp://host:8786``); the studies then run on its
            workers, which must see the same file system. Overrides ``workers``.
        manifest_name: file name of the manifest in ``out_dir``; ``None`` keeps no manifest (and no resume), for
            stages that write their own report.

    Returns:
        The summary. The manifest is only written once it would hold at least one ``ok`` study (or already
        existed), so a run whose every study failed leaves no files behind.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / manifest_name if manifest_name else None
    all_columns = list(BASE_COLUMNS) + [c for c in columns if c not in BASE_COLUMNS]
    existed = manifest_path is not None and manifest_path.is_file()
    previous = {r["study_id"]: r for r in read_manifest(manifest_path)} if manifest_path else {}
    rows: dict[str, dict[str, Any]] = dict(previous)
    summary = BatchSummary(manifest=manifest_path)
    todo, by_id, summary.n_skipped = _resume_plan(studies, previous, out_dir, resume)

    def record(row: dict[str, Any]) -> None:
        by_id[row["study_id"]] = row
        rows[row["study_id"]] = row
        if on_result is not None:
            on_result(row)
        if manifest_path and (existed or any(r.get("status") == "ok" for r in rows.values())):
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_manifest(manifest_path, rows.values(), all_columns)

    created_dir = not out_dir.exists()
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)  # temp files of a killed run
    _run_studies(todo, out_dir, fn, record, workers=workers, scheduler=scheduler, desc=desc)

    summary.rows = list(by_id.values())
    summary.n_ok = sum(1 for r in summary.rows if r.get("status") == "ok") - summary.n_skipped
    summary.n_failed = sum(1 for r in summary.rows if r.get("status") == "error")
    if created_dir and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # nothing succeeded: leave no trace
    return summary


def _resume_plan(
    studies: Sequence[Study], previous: dict[str, dict[str, Any]], out_dir: Path, resume: bool
) -> tuple[list[Study], dict[str, dict[str, Any]], int]:
    """The resume decision: which studies still have to run.

    A study whose id was already seen in ``studies`` becomes an error row; with ``resume``, a study whose previous
    manifest row is ``ok`` and whose output still has the recorded sha256 is skipped (its old row is kept).

    Args:
        studies: the batch's studies, in input order.
        previous: the existing manifest's rows by study id (empty when there is none).
        out_dir: the output folder the manifest's ``output`` names are relative to.
        resume: skip the studies already done.

    Returns:
        ``(todo, rows, n_skipped)``: the studies to run in input order; the rows decided without running, by study id
        (a duplicate under ``<id>#dup<k>``), in input order; how many studies were skipped.
    """
    by_id: dict[str, dict[str, Any]] = {}
    n_skipped = 0
    todo: list[Study] = []
    seen: dict[str, Study] = {}
    for study in studies:
        if study.study_id in seen:
            by_id[f"{study.study_id}#dup{len(by_id)}"] = _failed_row(study, InputError(
                f"{study.path}: duplicate study id {study.study_id!r} (also {seen[study.study_id].path}); rename one"))
            continue
        seen[study.study_id] = study
        old = previous.get(study.study_id)
        if resume and old and old.get("status") == "ok" and old.get("output"):
            out = out_dir / old["output"]
            if out.is_file() and sha256_file(out) == old.get("sha256"):
                by_id[study.study_id] = dict(old, status="ok")
                n_skipped += 1
                continue
        todo.append(study)
    return todo, by_id, n_skipped


def _run_studies(
    todo: list[Study],
    out_dir: Path,
    fn: Callable[[Study, Path], dict[str, Any]],
    record: Callable[[dict[str, Any]], None],
    *,
    workers: int,
    scheduler: str | None,
    desc: str,
) -> None:
    """Run ``fn`` on every study where the options say (a Dask cluster, this process, or worker processes), passing
    each finished row to ``record`` in this process."""
    if scheduler:
        _run_dask(todo, out_dir, fn, scheduler, record, desc)
    elif workers <= 0:
        for study in progress(todo, total=len(todo), desc=desc, unit="studies"):
            record(_run_one(fn, study, out_dir))
    else:
        _run_pool(todo, out_dir, fn, workers, record, desc)


def _run_pool(
    todo: list[Study],
    out_dir: Path,
    fn: Callable[[Study, Path], dict[str, Any]],
    workers: int,
    record: Callable[[dict[str, Any]], None],
    desc: str,
) -> None:
    """Process studies in spawned worker processes, recording rows in the main process as they finish."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started its thread pool can deadlock
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as pool, progress_task(len(todo), desc, "studies") as bar:
        futures: dict[Future, Study] = {pool.submit(_run_one, fn, s, out_dir): s for s in todo}
        not_done = set(futures)
        while not_done:
            done, not_done = wait(not_done, return_when=FIRST_COMPLETED)
            for fut in done:
                study = futures[fut]
                try:
                    row = fut.result()
                except BrokenProcessPool:  # a worker was killed (e.g. by the OOM killer): fail its studies only
                    row = _failed_row(study, InputError(
                        f"{study.path}: worker process died (out of memory?); rerun with fewer --workers"))
                record(row)
                bar.advance()


def _run_dask(
    todo: list[Study],
    out_dir: Path,
    fn: Callable[[Study, Path], dict[str, Any]],
    scheduler: str,
    record: Callable[[dict[str, Any]], None],
    desc: str,
) -> None:
    """Process studies on a Dask cluster; rows come back to this process, which alone writes the manifest."""
    try:
        from dask.distributed import Client, as_completed
    except ImportError as err:  # pragma: no cover - optional dependency
        raise InputError("--scheduler needs dask.distributed: pip install 'covidctnet[dask]'") from err
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as err:
        raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from err
    try:
        futures = [
            client.submit(_run_one, fn, s, out_dir, pure=False, key=f"covidctnet-{desc}-{s.study_id}") for s in todo
        ]
        by_key = {f.key: s for f, s in zip(futures, todo)}
        with progress_task(len(todo), desc, "studies") as bar:
            for fut in as_completed(futures, loop=client.loop):
                study = by_key[fut.key]
                try:
                    row = fut.result()
                except Exception as err:  # noqa: BLE001 - a lost worker fails only its own study
                    row = _failed_row(study, InputError(f"{study.path}: Dask worker failed: {err}"))
                record(row)
                bar.advance()
    finally:
        client.close()
