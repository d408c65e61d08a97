"""Model directories: a self-describing folder of weights, like a MONAI bundle or an nnU-Net model folder.

Layout::

    MODEL_DIR/
      config.yaml            # ModelDirConfig: name, task, class names, threshold, components (architecture + kwargs
                           # + weights file), input grid, the preprocessing expected; then what trained it
      <component>.safetensors  # one file per network, e.g. denoiser.safetensors, classifier.safetensors
      MODEL_CARD.md          # what trained it, how it was evaluated, intended use; not a medical device; with the
                             # metadata header the Hugging Face hub reads (covidctnet.core.model_card)
      SHA256SUMS             # sha256 of every weights file and of config.yaml (``sha256sum -c`` format)

Weights are safetensors only, so loading never unpickles (no code can run from a weights file). Loading verifies every
hash and refuses a mismatch.

No absolute path is written: a path recorded in ``config.yaml``, the card or a copied text file (commands, data
folders, provenance of copied weights) is made relative to the working directory (:func:`portable_paths`), so a
model directory can be shipped without the folder layout of the machine that trained it.

Every model kind (denoiser, 3D classifier, slice model, slice encoder, ensembles) writes the one schema of
:class:`ModelDirConfig`. Directories written before it (slice models with ``preprocessing`` and ``classes`` instead of
``preprocess`` and ``class_names``) still load: their keys are read as the current ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from covidctnet.core.errors import ModelDirError
from covidctnet.core.files import atomic_dir, sha256_file
from covidctnet.core.model_card import card_metadata, split_front_matter, with_front_matter

__all__ = ["ComponentEntry", "ModelDirConfig", "ModelDir", "save_model_dir", "load_model_dir", "dir_stamp",
           "CONFIG_NAME", "CARD_NAME", "SUMS_NAME", "TASKS", "portable_paths", "absolute_paths", "TEXT_SUFFIXES",
           "update_model_config", "classifier_grid", "sums_sha256", "cached_by_model_dir"]

T = TypeVar("T")

CONFIG_NAME = "config.yaml"
CARD_NAME = "MODEL_CARD.md"
SUMS_NAME = "SHA256SUMS"


TASKS = ("covidctnet", "classifier", "denoise", "lesion", "slice", "slice-encoder")
"""``covidctnet``: denoiser + 3D classifier (what ``predict`` runs); ``classifier``: the 3D classifier alone (or with a
denoiser from the Keras import); ``denoise``: a BCDU-Net; ``slice``: a 2D slice model or ensemble; ``slice-encoder``: a
SimCLR encoder for ``train-slice --init``."""

TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".md", ".csv", ".txt")
"""Copied files whose text is made portable (:func:`portable_paths`) as it is written into a model directory."""

# An absolute POSIX path inside free text: a '/' that does not follow a word character, ':', another '/' or a closing
# bracket (so "and/or", "16-bit / 65535", URLs and "<data>/cache" are left alone), then one or more path parts.
_ABS_PATH = re.compile(r"(?<![\w.:/~\\>)\]}-])/(?:[\w.@+=-]+/)*[\w.@+=-]+/?")

_LEGACY_KEYS = {"preprocessing": "preprocess", "classes": "class_names"}  # slice model directories before the schema


@dataclass(frozen=True)
class ComponentEntry:
    """One network of a model directory (``components.<name>`` in ``config.yaml``).

    Attributes:
        arch: architecture name the registry builds (``bcdunet``, ``covidctnet3d``, ``resnet18`` …).
        kwargs: keyword arguments of the builder.
        weights: the safetensors file (``<name>.safetensors``); filled in by :func:`save_model_dir`.
        members: for an ensemble, how many copies of the network the weights hold (``members.<i>.…``).
        source: provenance of weights copied from another directory (its path and sha256).
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    members: int | None = None
    source: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ComponentEntry:
        """Validate one ``components.<name>`` mapping.

        Raises:
            ModelDirError: not a mapping, unknown keys, or a value of the wrong type (named with ``where``).
        """
        if not isinstance(raw, Mapping):
            raise ModelDirError(f"{where}: expected a mapping with 'arch' and 'kwargs', not {type(raw).__name__}")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelDirError(f"{where}: unknown key(s) {unknown}")
        entry = cls(**{"arch": None, **raw})
        if not isinstance(entry.arch, str) or not entry.arch:
            raise ModelDirError(f"{where}: 'arch' must be an architecture name, not {entry.arch!r}")
        if not isinstance(entry.kwargs, Mapping):
            raise ModelDirError(f"{where}: 'kwargs' must be a mapping, not {type(entry.kwargs).__name__}")
        if entry.members is not None and (isinstance(entry.members, bool) or not isinstance(entry.members, int)
                                          or entry.members < 2):
            raise ModelDirError(f"{where}: 'members' must be an integer >= 2, not {entry.members!r}")
        bare = isinstance(entry.weights, str) and Path(entry.weights).name == entry.weights
        if entry.weights is not None and (not bare or entry.weights in ("", ".", "..")):
            raise ModelDirError(f"{where}: 'weights' must be a file name in the model directory, not {entry.weights!r}")
        if entry.source is not None and not isinstance(entry.source, Mapping):
            raise ModelDirError(f"{where}: 'source' must be a mapping, not {entry.source!r}")
        return entry

    def to_dict(self) -> dict[str, Any]:
        """The ``config.yaml`` mapping (unset fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelDirConfig:
    """``config.yaml`` of a model directory: one schema for every model kind.

    Attributes:
        name: model name (shown in reports and ``preds.csv``); ``None``: the folder's name.
        task: one of :data:`TASKS` (``None`` only in directories written before tasks were recorded).
        components: the networks, by component name (``denoiser``, ``classifier``, ``model``, ``encoder``).
        class_names: the output classes in index order (``control, covid, cap``; ``noncovid, covid``).
        threshold: decision threshold on ``p_covid`` of a slice model (``p >= threshold`` is COVID-19).
        input: the network input grid (``depth``, ``size_xy`` …) where it is not the preprocessing's.
        preprocess: the preprocessing the model expects (``PreprocessConfig`` fields for CT volumes; ``size``,
            ``lung_mask`` … for slice images).
        training: how the model was trained (data, command, epochs, seed …); free-form.
        validation: figures on the validation split that chose it; free-form.
        extra: any other key, kept as written (``positive_class``, ``ensemble``, ``threshold_selection`` …).
    """

    name: str | None
    task: str | None
    components: dict[str, ComponentEntry]
    class_names: list[str] | None = None
    threshold: float | None = None
    input: dict[str, Any] | None = None
    preprocess: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = CONFIG_NAME) -> ModelDirConfig:
        """Validate a ``config.yaml`` mapping; the legacy keys ``preprocessing`` and ``classes`` are read as
        ``preprocess`` and ``class_names``.

        Raises:
            ModelDirError: a missing or mistyped key, an unknown task, or both a key and its legacy name.
        """
        if not isinstance(raw, Mapping):
            raise ModelDirError(f"{source}: expected a mapping of keys to values, not {type(raw).__name__}")
        data = dict(raw)
        for old, new in _LEGACY_KEYS.items():
            if old in data:
                if new in data:
                    raise ModelDirError(f"{source}: both '{old}' and '{new}'; keep '{new}'")
                data[new] = data.pop(old)
        comps = data.pop("components", None)
        if not isinstance(comps, Mapping) or not comps:
            raise ModelDirError(f"{source}: expected a 'components' mapping with at least one network")
        components = {str(k): ComponentEntry.from_dict(v, f"{source}: components.{k}") for k, v in comps.items()}
        known = {f.name for f in dataclasses.fields(cls)} - {"components", "extra"}
        fields = {k: data.pop(k) for k in list(data) if k in known}
        cfg = cls(components=components, extra=data, **{"name": None, "task": None, **fields})
        if cfg.name is not None and not isinstance(cfg.name, str):
            raise ModelDirError(f"{source}: 'name' must be a string, not {cfg.name!r}")
        if cfg.task is not None and cfg.task not in TASKS:
            raise ModelDirError(f"{source}: 'task' must be one of {list(TASKS)}, not {cfg.task!r}")
        if cfg.class_names is not None and (not isinstance(cfg.class_names, list)
                                            or not all(isinstance(c, str) for c in cfg.class_names)):
            raise ModelDirError(f"{source}: 'class_names' must be a list of names, not {cfg.class_names!r}")
        if cfg.threshold is not None and (isinstance(cfg.threshold, bool) or not isinstance(cfg.threshold, (int, float))
                                          or not 0.0 <= cfg.threshold <= 1.0):
            raise ModelDirError(f"{source}: 'threshold' must be a number in [0, 1], not {cfg.threshold!r}")
        for key in ("input", "preprocess", "training", "validation"):
            if getattr(cfg, key) is not None and not isinstance(getattr(cfg, key), Mapping):
                raise ModelDirError(f"{source}: '{key}' must be a mapping, not {getattr(cfg, key)!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The ``config.yaml`` mapping: the schema's keys in a fixed order (unset ones left out), then ``extra``."""
        out: dict[str, Any] = {}
        for key in ("name", "task", "class_names", "threshold"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["components"] = {k: v.to_dict() for k, v in self.components.items()}
        for key in ("input", "preprocess", "training", "validation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}


@dataclass
class ModelDir:
    """A loaded model directory; weights are read on demand, hash-checked.

    Attributes:
        path: the folder.
        config: ``config.yaml`` as a plain mapping in the current schema (legacy keys renamed).
        sha256: file name -> sha256 from ``SHA256SUMS``.
    """

    path: Path
    config: dict[str, Any]
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self) -> ModelDirConfig:
        """``config`` as a validated :class:`ModelDirConfig`."""
        return ModelDirConfig.from_dict(self.config, str(self.path / CONFIG_NAME))

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.name))

    def component(self, name: str) -> dict[str, Any]:
        """The config of one component (``arch``, ``kwargs``, ``weights``)."""
        comps = self.config.get("components", {})
        if name not in comps:
            raise ModelDirError(f"{self.path}: no component {name!r} in {CONFIG_NAME}; found {sorted(comps)}")
        if not comps[name].get("weights"):
            raise ModelDirError(f"{self.path / CONFIG_NAME}: component {name!r} names no weights file")
        return comps[name]

    def weights_sha256(self, name: str) -> str:
        """sha256 of one component's weights file, as ``SHA256SUMS`` records it."""
        return self.sha256[self.component(name)["weights"]]

    @property
    def sums_sha256(self) -> str:
        """The model's identity (:func:`sums_sha256`)."""
        return sums_sha256(self.path)

    def classifier_grid(self) -> tuple[int, int, int]:
        """The classifier's input grid ``(depth, height, width)`` in voxels (see :func:`classifier_grid`)."""
        return classifier_grid(self.config, self.path)

    def weights_path(self, name: str) -> Path:
        """One component's weights file, after checking it against ``SHA256SUMS``.

        Raises:
            ModelDirError: the file is missing or its sha256 differs.
        """
        fname = self.component(name)["weights"]
        path = self.path / fname
        if not path.is_file():
            raise ModelDirError(f"{path}: weights file missing")
        actual = sha256_file(path)
        if actual != self.sha256.get(fname):
            raise ModelDirError(
                f"{path}: sha256 {actual[:12]}… does not match SHA256SUMS ({str(self.sha256.get(fname))[:12]}…); "
                "the weights were changed or corrupted"
            )
        return path

    def state_dict(self, name: str) -> dict[str, Any]:
        """Read one component's weights (safetensors) as a dict of CPU tensors, after checking its hash."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.weights_path(name)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelDirError(f"{path}: cannot read safetensors weights: {err}") from err


def sums_sha256(path: str | os.PathLike) -> str:
    """sha256 of a directory's ``SHA256SUMS``: the model's identity (it covers ``config.yaml`` and every weights
    file), what ``predict``, ``predict-slice`` and the exports record as ``weights_sha256``."""
    return sha256_file(Path(path) / SUMS_NAME)


def classifier_grid(config: Mapping[str, Any], where: Any = CONFIG_NAME) -> tuple[int, int, int]:
    """The classifier's input grid ``(depth, height, width)`` in voxels from a model directory's config.

    The official CNN records it as its ``input_size`` kwarg; MONAI networks (global pooling) may not, and then the
    config's ``input`` (``depth``, ``size_xy``) gives it.

    Args:
        config: ``config.yaml`` as a mapping.
        where: the directory or file, for the message.

    Raises:
        ModelDirError: no classifier component, or neither records a 3-axis grid.
    """
    entry = (config.get("components") or {}).get("classifier")
    if entry is None:
        raise ModelDirError(f"{where}: no classifier component in {CONFIG_NAME}")
    size = (entry.get("kwargs") or {}).get("input_size")
    grid = config.get("input") or {}
    if not size and "depth" in grid and "size_xy" in grid:
        size = (grid["depth"], grid["size_xy"], grid["size_xy"])
    if not size or len(size) != 3:
        raise ModelDirError(f"{where}: the classifier's input_size (depth, height, width) is not recorded")
    depth, height, width = (int(s) for s in size)
    return depth, height, width


def absolute_paths(value: Any) -> list[str]:
    """Every absolute POSIX path found in ``value`` (a string, or the strings nested in mappings and lists)."""
    if isinstance(value, str):
        return _ABS_PATH.findall(value)
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in absolute_paths(k) + absolute_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in absolute_paths(v)]
    return []


def portable_paths(value: Any, base: str | os.PathLike | None = None) -> Any:
    """``value`` with every absolute path made relative to ``base`` (default: the working directory).

    A command line or data folder recorded relative to where the command ran stays meaningful (rerun from the same
    place) without naming the machine's folders. Strings nested in mappings and lists are rewritten; other values are
    returned as they are.
    """
    if isinstance(value, str):
        root = os.fspath(base) if base is not None else os.getcwd()
        return _ABS_PATH.sub(lambda m: Path(os.path.relpath(m.group(0), root)).as_posix()
                             + ("/" if m.group(0).endswith("/") else ""), value)
    if isinstance(value, Mapping):
        return {portable_paths(k, base): portable_paths(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, base) for v in value]
    return value


def save_model_dir(
    out_dir: str | os.PathLike,
    config: ModelDirConfig | Mapping[str, Any],
    state_dicts: dict[str, dict[str, Any]],
    card: str,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> ModelDir:
    """Write a model directory atomically (built in a temp folder, then renamed into place).

    Args:
        out_dir: destination folder; replaced if it exists.
        config: ``config.yaml`` content (a mapping is validated as a :class:`ModelDirConfig`); each component
            saved gets ``weights: <name>.safetensors`` filled in.
        state_dicts: ``{component name: state_dict}``; tensors are made contiguous and saved as safetensors.
        card: Markdown text of ``MODEL_CARD.md``; a card without a metadata header gets the one
            :func:`~covidctnet.core.model_card.card_metadata` derives from the config.
        extra_files: other files to copy in (name → source path), e.g. ``metrics.csv``; the text of those named in
            :data:`TEXT_SUFFIXES` is made portable like the config.

    Absolute paths in the config, the card and the copied text files are written relative to the working directory
    (:func:`portable_paths`).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    raw = config.to_dict() if isinstance(config, ModelDirConfig) else config
    spec = ModelDirConfig.from_dict(portable_paths(raw), str(out_dir / CONFIG_NAME))
    missing = sorted(set(state_dicts) - set(spec.components))
    if missing:
        raise ModelDirError(f"{out_dir}: weights for {missing} but no such component in the config")
    components = {k: dataclasses.replace(v, weights=f"{k}.safetensors") if k in state_dicts else v
                  for k, v in spec.components.items()}
    without = sorted(set(components) - set(state_dicts))
    if without:
        raise ModelDirError(f"{out_dir}: no weights given for component(s) {without} of the config")
    spec = dataclasses.replace(spec, components=components)
    card = portable_paths(card)
    if not split_front_matter(card)[0]:
        card = with_front_matter(card, card_metadata(spec.to_dict(), out_dir.name))
    with atomic_dir(out_dir) as tmp:
        for name, sd in state_dicts.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / components[name].weights))
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        (tmp / CARD_NAME).write_text(card)
        for name, src in (extra_files or {}).items():
            if Path(name).suffix.lower() in TEXT_SUFFIXES:
                (tmp / name).write_text(portable_paths(Path(src).read_text()))
            else:
                shutil.copyfile(src, tmp / name)
        hashed = [CONFIG_NAME] + sorted(c.weights for c in components.values() if c.weights)
        (tmp / SUMS_NAME).write_text("".join(f"{sha256_file(tmp / f)}  {f}\n" for f in hashed))
    return load_model_dir(out_dir)


def update_model_config(path: str | os.PathLike, changes: Mapping[str, Any]) -> ModelDir:
    """Set top-level keys of a model directory's ``config.yaml`` (e.g. a colour scale computed after training) and
    its line in ``SHA256SUMS``; weights and other files are copied unchanged.

    The directory is checked first (hashes included) and replaced atomically, as :func:`save_model_dir` writes one.

    Args:
        path: the model directory.
        changes: ``{key: value}``; the values are made portable (:func:`portable_paths`) like the rest of the config.

    Raises:
        ModelDirError: the directory does not load, a weights file does not match its hash, or the new config does
            not fit the schema.
    """
    md = load_model_dir(path)
    for name, digest in md.sha256.items():
        if name != CONFIG_NAME and sha256_file(md.path / name) != digest:
            raise ModelDirError(f"{md.path / name}: sha256 does not match SHA256SUMS; not updating a changed directory")
    raw = yaml.safe_load((md.path / CONFIG_NAME).read_text()) or {}
    new = {**raw, **portable_paths(dict(changes))}  # the keys as written, in their order; new ones at the end
    ModelDirConfig.from_dict(new, str(md.path / CONFIG_NAME))
    with atomic_dir(md.path) as tmp:
        for f in md.path.iterdir():
            if f.is_file() and f.name not in (CONFIG_NAME, SUMS_NAME):
                shutil.copyfile(f, tmp / f.name)
            elif f.is_dir():
                shutil.copytree(f, tmp / f.name)
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(new, sort_keys=False))
        sums = {**md.sha256, CONFIG_NAME: sha256_file(tmp / CONFIG_NAME)}
        (tmp / SUMS_NAME).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return load_model_dir(md.path)


def load_model_dir(path: str | os.PathLike) -> ModelDir:
    """Open a model directory: parse ``config.yaml`` and ``SHA256SUMS`` and check the config's hash.

    Weights hashes are checked when a component's weights are read (:meth:`ModelDir.state_dict`).

    Raises:
        ModelDirError: missing files, unreadable YAML, or a hash mismatch.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a model directory (expected a folder with {CONFIG_NAME} and {SUMS_NAME})")
    for name in (CONFIG_NAME, SUMS_NAME):
        if not (path / name).is_file():
            raise ModelDirError(f"{path}: {name} missing; not a covidctnet model directory")
    sums: dict[str, str] = {}
    for line in (path / SUMS_NAME).read_text().splitlines():
        if line.strip():
            digest, _, fname = line.partition("  ")
            sums[fname.strip()] = digest.strip()
    if sums.get(CONFIG_NAME) != sha256_file(path / CONFIG_NAME):
        raise ModelDirError(f"{path / CONFIG_NAME}: sha256 does not match SHA256SUMS; the config was edited")
    try:
        config = yaml.safe_load((path / CONFIG_NAME).read_text()) or {}
    except yaml.YAMLError as err:
        raise ModelDirError(f"{path / CONFIG_NAME}: not valid YAML: {str(err).splitlines()[0]}") from err
    spec = ModelDirConfig.from_dict(config, str(path / CONFIG_NAME))
    return ModelDir(path=path, config=spec.to_dict(), sha256=sums)


def dir_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """``(mtime_ns, inode)`` of ``path/SHA256SUMS``, ``(0, 0)`` if absent: a cache key that changes when the directory
    is rewritten (:func:`save_model_dir` publishes a new folder, hence a new SHA256SUMS), so per-process model caches
    never serve stale weights."""
    sums = Path(path) / SUMS_NAME
    st = sums.stat() if sums.is_file() else None
    return (st.st_mtime_ns, st.st_ino) if st else (0, 0)



def cached_by_model_dir(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator of a loader whose first argument is a model directory: it runs once per process for each directory
    and arguments (worker processes each load their own), and again when the directory is rewritten
    (:func:`dir_stamp`), so a cache never serves stale weights. ``cache_clear()`` empties it.

    Args:
        maxsize: loaded models kept (least recently used go first).
    """
    def decorate(load: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=maxsize)
        def cached(path: str, stamp: tuple[int, int], *args: Any, **kwargs: Any) -> T:
            return load(path, *args, **kwargs)

        @functools.wraps(load)
        def call(path: str | os.PathLike, *args: Any, **kwargs: Any) -> T:
            return cached(str(path), dir_stamp(path), *args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call

    return decorate