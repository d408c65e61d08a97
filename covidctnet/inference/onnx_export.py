"""ONNX export of a model directory and the onnxruntime backend of ``predict`` / ``predict-slice``.

``covidctnet export-onnx MODEL_DIR -o OUT_DIR`` writes a self-contained *ONNX model directory*::

    OUT_DIR/
      config.yaml        # copied byte for byte from MODEL_DIR (preprocessing, input sizes, component specs)
      MODEL_CARD.md      # copied
      SHA256SUMS         # copied: it still matches config.yaml, and its sha256 (the report's ``weights_sha256``)
                         # is the source model's, so both backends report the same model identity
      denoiser.onnx      # (B, 1, S, S) in [0, 1] -> denoised slice          } a predict model directory
      denoiser_int8.onnx # the same, int8 (only with --int8-calibration)     }
      classifier.onnx    # (B, 1, D, H, W) residual -> (B, 3) logits         }
      model.onnx         # (B, C, S, S) -> (B, 2) logits                       a predict-slice model directory
      onnx.json          # manifest: files, sha256, input/output names and shapes, opset, export check results,
                         # and the sha256 of the copied SHA256SUMS (ties the ONNX files to that config)

The safetensors weights are not copied: the folder is what a deployment needs, and ``--backend torch`` keeps using
the original ``MODEL_DIR``. ``predict --backend onnx --model OUT_DIR`` loads it with :func:`load_onnx_component`.

Each network is exported with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``; it needs
no ``onnxscript``) with a dynamic batch axis, checked with ``onnx.checker`` and run through onnxruntime on a random
batch of another batch size than the one traced: an export whose outputs differ from PyTorch's by more than
``tolerance`` (1e-4) is refused and nothing is written. The whole folder is built next to ``OUT_DIR`` and renamed
into place, so a failed or killed export leaves no partial folder.

**The export cache.** ``--backend auto`` (the default) and a forced ``onnx`` or ``openvino`` backend given a PyTorch
model directory run :func:`cached_export`: the same export, built on first use into
``$XDG_CACHE_HOME/covidctnet/onnx/<weights>-<exporter>/`` (``~/.cache/covidctnet`` when ``XDG_CACHE_HOME`` is unset),
where ``<weights>`` starts the sha256 of the model's ``SHA256SUMS`` (the report's ``weights_sha256``) and
``<exporter>`` the sha256 of :func:`exporter_version` (covidctnet, torch and onnx versions, opset). An entry is used
only when its ``onnx.json`` names that model and exporter and every file's sha256 matches; a corrupt or stale one is
rebuilt. Builds hold a lock file beside the entry, so two processes starting at once export once; the entry itself
appears by a rename. Deleting the folder clears the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.core.files import atomic_dir, sha256_file
from covidctnet.core.model_dir import load_model_dir, sums_sha256
from covidctnet.inference.int8 import calibration_volumes, gate_int8, quantize_denoiser
from covidctnet.models.registry import Denoiser, load_classifier, load_denoiser, load_slice_model
from covidctnet.preprocessing.preprocess import recorded_preprocess

__all__ = [
    "ONNX_MANIFEST",
    "OnnxExport",
    "OnnxModule",
    "cache_root",
    "cached_export",
    "export_onnx",
    "exporter_version",
    "is_onnx_export",
    "load_onnx_manifest",
    "load_onnx_component",
    "load_onnx_denoiser",
    "onnx_component_path",
]

logger = logging.getLogger(__name__)

ONNX_MANIFEST = "onnx.json"
INT8_COMPONENT = "denoiser_int8"
"""The int8 denoiser's name in ``onnx.json`` (see :mod:`covidctnet.inference.int8`)."""
OPSET = 17
TOLERANCE = 1e-4
_COPIED = ("config.yaml", "MODEL_CARD.md", "SHA256SUMS", "lesion.safetensors")
"""Copied from the PyTorch model directory when present; a lesion model (``evidence: lesion``) is small and runs in
PyTorch beside the exported networks, so its weights travel with the export."""
_TRACE_BATCH, _CHECK_BATCH = 1, 2  # checking with another batch size than the traced one proves the axis is dynamic
_LOCK_TIMEOUT_S = 1800.0  # another process exporting the same model: its export of a large model takes minutes


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        out_dir: the ONNX model directory.
        components: ``{name: manifest entry}`` (file, sha256, input shape, ``max_abs_diff`` against PyTorch).
    """
    out_dir: Path
    components: dict[str, dict[str, Any]]


def _torch_components(model_dir: Path) -> tuple[Any, dict[str, tuple[Any, tuple[int, ...], str]]]:
    """The networks of a predict or slice model directory on the CPU, with one example input shape each.

    Returns:
        ``(ModelDir, {name: (module in eval mode, input shape with batch 1, input kind)})``; kind ``unit`` means
        inputs in [0, 1] (a preprocessed slice), ``normal`` z-scored or signed inputs.
    """
    md = load_model_dir(model_dir)
    comps = md.config.get("components") or {}
    if md.config.get("task") == "slice":
        model, config = load_slice_model(md.path, "cpu")
        size = int((config.get("preprocess") or {}).get("size", 0))
        channels = int((md.component("model").get("kwargs") or {}).get("in_channels", 1))
        if size < 1:
            raise ModelDirError(f"{md.path / 'config.yaml'}: no preprocess.size for the slice model's input")
        return md, {"model": (model, (1, channels, size, size), "normal")}
    if "denoiser" not in comps:
        raise ModelDirError(f"{md.path}: no denoiser component in config.yaml (found {sorted(comps)}); export-onnx "
                            "takes a predict model directory (denoiser + classifier), a denoiser model directory or a "
                            "slice model directory (task: slice)")

    den = load_denoiser(md.path, device="cpu")
    modules = {"denoiser": (den.model, (1, 1, den.size_xy, den.size_xy), "unit")}
    if "classifier" not in comps:  # a denoiser model directory (train-denoiser; slice-scores and residuals use it)
        return md, modules
    classifier = load_classifier(md, device="cpu")
    return md, {**modules, "classifier": (classifier, (1, 1, *md.classifier_grid()), "normal")}


def _random_batch(shape: tuple[int, ...], batch: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    full = (batch, *shape[1:])
    return torch.rand(full, generator=g) if kind == "unit" else torch.randn(full, generator=g)


def _export_one(name: str, module: Any, shape: tuple[int, ...], kind: str, path: Path, opset: int,
                tolerance: float, seed: int, log_level: int = logging.INFO) -> dict[str, Any]:
    """Export, check and compare one network; raises ModelDirError when onnxruntime and PyTorch disagree."""
    import onnx
    import onnxruntime as ort

    output_name = "denoised" if name == "denoiser" else "logits"
    module = module.cpu().eval()
    with warnings.catch_warnings():
        # the exporter warns about the shape checks in forward() being traced as constants: that is intended
        # (H, W, D are fixed per model, only the batch axis is dynamic)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(module, (_random_batch(shape, _TRACE_BATCH, kind, seed),), str(path), dynamo=False,
                          input_names=["input"], output_names=[output_name], opset_version=opset,
                          dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}}, do_constant_folding=True)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ModelDirError(f"{name}: the exported ONNX graph is invalid: {str(err).splitlines()[0]}") from err
    x = _random_batch(shape, _CHECK_BATCH, kind, seed + 1)
    with torch.inference_mode():
        expected = module(x).float().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ModelDirError(f"{name}: onnxruntime output shape {got.shape} differs from PyTorch's {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if not diff <= tolerance:  # also catches NaN
        raise ModelDirError(f"{name}: onnxruntime and PyTorch outputs differ by {diff:.3g} > {tolerance:g} on a "
                            f"random batch of {_CHECK_BATCH}; export refused, nothing written")
    logger.log(log_level, "%s: exported to ONNX (opset %d), max |onnxruntime - PyTorch| = %.2e on batch %d", name,
               opset, diff, _CHECK_BATCH)
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "input": "input",
        "output": output_name,
        "input_shape": ["batch", *shape[1:]],
        "max_abs_diff": diff,
        "checked_batch": _CHECK_BATCH,
    }


def export_onnx(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    int8_calibration: Sequence[str | os.PathLike] = (),
    calibration_slices: int = 32,
    log_level: int = logging.INFO,
) -> OnnxExport:
    """``covidctnet export-onnx``: write an ONNX model directory (layout in the module docstring).

    Args:
        model_dir: a predict model directory (``denoiser`` + ``classifier``) or a slice model directory.
        out_dir: the ONNX model directory to write; replaced if it is an earlier export, refused if it is any
            other non-empty folder.
        opset: ONNX opset of the export.
        tolerance: largest accepted ``|onnxruntime - PyTorch|`` on the check batch.
        seed: seed of the random trace and check batches.
        int8_calibration: control CT scans (DICOM folders, NIfTI files, dataset roots); when given, an int8
            denoiser is added (``denoiser_int8.onnx``), calibrated and gated on them (:mod:`covidctnet.inference.int8`).
        calibration_slices: slices of those scans the quantisation ranges are taken from.
        log_level: of the lines saying what was exported (the cache logs them at DEBUG and says one line itself).

    Returns:
        What was written.

    Raises:
        ModelDirError: not a predict/slice model directory (e.g. no denoiser), hash mismatch, an export that
            fails ``onnx.checker`` or disagrees with PyTorch by more than ``tolerance``, or an int8 denoiser that
            fails the accuracy gate.
        ConfigError: ``out_dir`` is ``model_dir`` or a non-empty folder that is not an ONNX export; int8
            calibration for a slice model.
        InputError: a calibration scan is missing, unreadable or fails the input checks.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError(f"{out_dir}: -o must differ from MODEL_DIR (the export would replace the source model)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / ONNX_MANIFEST).is_file():
        raise ConfigError(f"{out_dir}: exists and is not an earlier ONNX export ({ONNX_MANIFEST} missing); "
                          "choose a new or empty folder")
    md, modules = _torch_components(model_dir)
    if int8_calibration and "denoiser" not in modules:
        raise ConfigError(f"{model_dir}: --int8-calibration quantises a denoiser; a slice model has none")
    if int8_calibration and md.config.get("evidence") == "lesion":
        raise ConfigError(f"{model_dir}: --int8-calibration quantises the denoiser, but this model's classifier reads "
                          "the lesion model's maps (evidence: lesion), so its gate could not check the classifier")
    with atomic_dir(out_dir) as tmp:
        entries = {name: _export_one(name, module, shape, kind, tmp / f"{name}.onnx", opset, tolerance, seed,
                                     log_level) for name, (module, shape, kind) in modules.items()}
        if int8_calibration:
            entries[INT8_COMPONENT] = _export_int8(md, modules, tmp, int8_calibration, calibration_slices)
        for fname in _COPIED:
            if (md.path / fname).is_file():
                shutil.copyfile(md.path / fname, tmp / fname)
        manifest = {
            "format": "covidctnet-onnx",
            "version": 1,
            "source": str(md.path),
            "source_sums_sha256": md.sums_sha256,
            "opset": opset,
            "exporter": exporter_version(opset),
            "tolerance": tolerance,
            "components": entries,
        }
        (tmp / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.log(log_level, "%s: ONNX model directory with %s", out_dir,
               ", ".join(e["file"] for e in entries.values()))
    return OnnxExport(out_dir, {k: dict(v) for k, v in entries.items()})


def _export_int8(md: Any, modules: dict[str, tuple[Any, tuple[int, ...], str]], tmp: Path,
                 inputs: Sequence[str | os.PathLike], slices: int) -> dict[str, Any]:
    """Quantise ``tmp/denoiser.onnx`` into ``tmp/denoiser_int8.onnx`` and gate it; returns its manifest entry."""
    volumes = calibration_volumes(inputs, recorded_preprocess(md))
    path = tmp / f"{INT8_COMPONENT}.onnx"
    quantization = quantize_denoiser(tmp / "denoiser.onnx", volumes, path, slices)
    depth, size = modules["classifier"][1][2], modules["denoiser"][1][2]
    gate = gate_int8(volumes, modules["denoiser"][0], OnnxModule(path, output_name="denoised"),
                     modules["classifier"][0], depth, size)
    return {"file": path.name, "sha256": sha256_file(path), "input": "input", "output": "denoised",
            "input_shape": ["batch", 1, size, size], **quantization, "gate": gate}


# --------------------------------------------------------------------------------------------------------------------
# the export cache (backend auto)


def exporter_version(opset: int = OPSET) -> str:
    """What an export depends on besides the weights: covidctnet's, torch's and onnx's versions and the opset (the
    second half of a cache entry's key, recorded as ``exporter`` in ``onnx.json``)."""
    versions = []
    for package in ("covidctnet", "onnx"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} unknown")
    return f"torch.onnx.export(dynamo=False), {versions[0]}, torch {torch.__version__}, {versions[1]}, opset {opset}"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/covidctnet``, or ``~/.cache/covidctnet`` when it is unset or not absolute (the XDG rule)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "covidctnet"


def is_onnx_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ONNX model directory (``export-onnx`` output: it has ``onnx.json``)."""
    return (Path(path) / ONNX_MANIFEST).is_file()


def _cache_problem(entry: Path, sums: str, exporter: str) -> str | None:
    """Why the cache entry cannot be used (``None``: it can): missing, made for another model or by another exporter
    (stale), or a file whose sha256 differs from ``onnx.json`` (corrupt)."""
    if not entry.is_dir():
        return "missing"
    try:
        manifest = json.loads((entry / ONNX_MANIFEST).read_text())
        if manifest.get("source_sums_sha256") != sums or sums_sha256(entry) != sums:
            return "stale: made for another model"
        if manifest.get("exporter") != exporter:
            return f"stale: made by {manifest.get('exporter')!r}, not {exporter!r}"
        load_model_dir(entry)  # config.yaml against the copied SHA256SUMS
        for entry_ in (manifest.get("components") or {}).values():
            if sha256_file(entry / entry_["file"]) != entry_["sha256"]:
                return f"corrupt: {entry_['file']} does not match its sha256 in {ONNX_MANIFEST}"
        if not manifest.get("components"):
            return f"corrupt: no components in {ONNX_MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ModelDirError) as err:
        return f"corrupt: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _check_weights(md: Any) -> None:
    """Every component's weights file against ``SHA256SUMS``, as loading them with PyTorch would check it.

    Raises:
        ModelDirError: a weights file is missing or its sha256 differs.
    """
    for name in md.config.get("components") or {}:
        md.weights_path(name)


def cached_export(model_dir: str | os.PathLike) -> Path:
    """The ONNX model directory of ``model_dir`` from the export cache, exported into it on first use.

    See the module docstring for the layout and the checks. A valid entry is used without a lock; otherwise the
    entry's lock is taken, the entry checked again (another process may have just built it), and a corrupt or stale
    one replaced by a fresh export (:func:`export_onnx`, whose checks against PyTorch hold as for ``export-onnx``).

    Returns:
        The entry's folder (an ONNX model directory for :func:`load_onnx_manifest`).

    Raises:
        ModelDirError: ``model_dir`` is not a model directory, a weights file does not match its ``SHA256SUMS`` (checked
            on every call, as PyTorch loading would), no denoiser, or its export fails the checks.
        ConfigError: the cache is locked by another export for longer than 30 minutes.
    """
    md = load_model_dir(model_dir)
    _check_weights(md)  # the key is SHA256SUMS: weights changed behind it must not find the entry of the originals
    sums, exporter = sums_sha256(md.path), exporter_version()
    root = cache_root() / "onnx"
    entry = root / f"{sums[:16]}-{hashlib.sha256(exporter.encode()).hexdigest()[:8]}"
    if _cache_problem(entry, sums, exporter) is None:
        return entry
    root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(entry) + ".lock", timeout=_LOCK_TIMEOUT_S):
            problem = _cache_problem(entry, sums, exporter)
            if problem is None:  # another process built it while this one waited
                return entry
            if problem != "missing":
                logger.warning("%s: cached ONNX export %s; exporting it again", entry, problem)
                shutil.rmtree(entry)
            # what an export of this entry killed half-way left (atomic_dir's temporary folder); others' builds of
            # other entries are left alone: they hold their own locks
            for stale in root.glob(f".{entry.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("%s: exporting to ONNX once for the onnx/openvino backends (checked against PyTorch), into "
                        "the cache %s", md.path, entry)
            export_onnx(md.path, entry, log_level=logging.DEBUG)
    except TimeoutError as err:  # filelock.Timeout
        raise ConfigError(f"{entry}.lock: another process has been exporting this model for over "
                          f"{_LOCK_TIMEOUT_S / 60:.0f} minutes; if none is, delete the lock file") from err
    return entry


# --------------------------------------------------------------------------------------------------------------------
# loading (the onnx backend)


def load_onnx_manifest(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Open an ONNX model directory: its ``config.yaml``/``SHA256SUMS`` (hash-checked) and ``onnx.json``.

    Returns:
        ``(ModelDir, manifest dict)``.

    Raises:
        ModelDirError: not a model directory, no ``onnx.json`` (a PyTorch model directory: export it first), or a
            manifest that belongs to another config.
    """
    md = load_model_dir(path)
    mpath = md.path / ONNX_MANIFEST
    if not mpath.is_file():
        raise ModelDirError(f"{md.path}: no {ONNX_MANIFEST}, not an ONNX model directory; create one with "
                            f"`covidctnet export-onnx {md.path} -o ONNX_DIR` and pass --model ONNX_DIR")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{mpath}: not valid JSON: {err}") from err
    sums = md.sums_sha256
    if manifest.get("source_sums_sha256") != sums:
        raise ModelDirError(f"{mpath}: made for another SHA256SUMS than the one in {md.path}; export again")
    return md, manifest


class OnnxModule(nn.Module):
    """An onnxruntime session behind the ``torch.nn.Module`` call interface.

    Code written for PyTorch modules (:func:`covidctnet.inference.residuals.compute_residual`, which calls ``net(x)``
    on CPU tensors in eval mode) runs it unchanged. It has no parameters: it always runs on the CPU.

    Args:
        path: the ``.onnx`` file.
        input_name, output_name: the graph's input and output names (from ``onnx.json``).
    """
    def __init__(self, path: str | os.PathLike, input_name: str = "input", output_name: str | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        # intra_op_num_threads left at its default (all cores), as PyTorch does
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = input_name
        self.output_name = output_name
        self.path = Path(path)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 batch (e.g. ``(B, 1, S, S)``) and return the first (named) output as float32."""
        names = [self.output_name] if self.output_name else None
        out = self.session.run(names, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def forward(self, x: Any) -> Any:
        """``x``: CPU tensor of the graph's input shape; returns a CPU float32 tensor."""
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))


def onnx_component_path(md: Any, manifest: dict[str, Any], name: str) -> Path:
    """The ``.onnx`` file of one component of an ONNX model directory, its sha256 checked against ``onnx.json``.

    Raises:
        ModelDirError: the component is not in ``onnx.json``, its file is missing or its hash differs.
    """
    entry = (manifest.get("components") or {}).get(name)
    if not entry:
        raise ModelDirError(f"{md.path / ONNX_MANIFEST}: no component {name!r}; found "
                            f"{sorted(manifest.get('components') or {})}")
    path = md.path / entry["file"]
    if not path.is_file():
        raise ModelDirError(f"{path}: ONNX file missing")
    if sha256_file(path) != entry.get("sha256"):
        raise ModelDirError(f"{path}: sha256 does not match {ONNX_MANIFEST}; the file was changed or corrupted")
    return path


def load_onnx_component(md: Any, manifest: dict[str, Any], name: str) -> OnnxModule:
    """One component of an ONNX model directory as an :class:`OnnxModule` (its sha256 checked against onnx.json).

    Raises:
        ModelDirError: see :func:`onnx_component_path`.
    """
    path = onnx_component_path(md, manifest, name)
    entry = manifest["components"][name]
    return OnnxModule(path, entry.get("input", "input"), entry.get("output"))


def load_onnx_denoiser(md: Any, manifest: dict[str, Any], module: nn.Module | None = None) -> Any:
    """The ``denoiser`` of an ONNX model directory as a :class:`covidctnet.models.registry.Denoiser` (CPU).

    Args:
        module: the network that runs ``denoiser.onnx`` (e.g. an OpenVINO one); ``None``: onnxruntime's
            :class:`OnnxModule`.

    Raises:
        ModelDirError: see :func:`load_onnx_component`; no input size in ``config.yaml``.
    """
    if module is None:
        module = load_onnx_component(md, manifest, "denoiser")
    preprocess = dict(md.config.get("preprocess") or {})
    size = (md.config.get("input") or {}).get("size_xy", preprocess.get("size_xy"))
    if isinstance(size, bool) or not isinstance(size, int):
        raise ModelDirError(f"{md.path / 'config.yaml'}: no input size (input.size_xy or preprocess.size_xy)")
    # the source's denoiser weights hash (the copied SHA256SUMS lists it), as the torch backend reports: a residuals
    # or slice-scores folder then resumes across backends
    sha = md.sha256.get((md.config.get("components") or {}).get("denoiser", {}).get("weights", ""))
    return Denoiser(module, size, md.path, sha or manifest["components"]["denoiser"]["sha256"], torch.device("cpu"),
                    preprocess)
