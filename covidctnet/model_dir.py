"""Model directories: a self-describing folder of weights, like a MONAI bundle or an nnU-Net model folder.

Layout::

    MODEL_DIR/
      config.yaml            # name, task, components (architecture + kwargs + weights file), preprocessing expected
      <component>.safetensors  # one file per network, e.g. denoiser.safetensors, classifier.safetensors
      MODEL_CARD.md          # what trained it, how it was evaluated, intended use; not a medical device
      SHA256SUMS             # sha256 of every weights file and of config.yaml (``sha256sum -c`` format)

Weights are safetensors only, so loading never unpickles (no code can run from a weights file). Loading verifies every
hash and refuses a mismatch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covidctnet.errors import ModelDirError
from covidctnet.utils import atomic_dir, sha256_file

__all__ = ["ModelDir", "save_model_dir", "load_model_dir", "dir_stamp"]

CONFIG_NAME = "config.yaml"
CARD_NAME = "MODEL_CARD.md"
SUMS_NAME = "SHA256SUMS"


@dataclass
class ModelDir:
    """A loaded model directory. ``config`` is the parsed ``config.yaml``; weights are read on demand, hash-checked."""

    path: Path
    config: dict[str, Any]
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.name))

    def component(self, name: str) -> dict[str, Any]:
        """The config of one component (``arch``, ``kwargs``, ``weights``)."""
        comps = self.config.get("components", {})
        if name not in comps:
            raise ModelDirError(f"{self.path}: no component {name!r} in {CONFIG_NAME}; found {sorted(comps)}")
        return comps[name]

    def weights_sha256(self, name: str) -> str:
        return self.sha256[self.component(name)["weights"]]

    def state_dict(self, name: str) -> dict[str, Any]:
        """Read one component's weights (safetensors) as a dict of CPU tensors, after checking its hash."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelDirError(f"{path}: cannot read safetensors weights: {err}") from err


def save_model_dir(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    state_dicts: dict[str, dict[str, Any]],
    card: str,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> ModelDir:
    """Write a model directory atomically (built in a temp folder, then renamed into place).

    Args:
        out_dir: destination folder; replaced if it exists.
        config: ``config.yaml`` content. ``components[name]`` gets ``weights: <name>.safetensors`` filled in.
        state_dicts: ``{component name: state_dict}``; tensors are made contiguous and saved as safetensors.
        card: Markdown text of ``MODEL_CARD.md``.
        extra_files: other files to copy in (name → source path), e.g. ``metrics.csv``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        config = dict(config)
        components = {k: dict(v) for k, v in config.get("components", {}).items()}
        for name, sd in state_dicts.items():
            fname = f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / fname))
            components.setdefault(name, {})["weights"] = fname
        config["components"] = components
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / CARD_NAME).write_text(card)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        hashed = [CONFIG_NAME] + sorted(c["weights"] for c in components.values() if "weights" in c)
        (tmp / SUMS_NAME).write_text("".join(f"{sha256_file(tmp / f)}  {f}\n" for f in hashed))
    return load_model_dir(out_dir)


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
    if not isinstance(config, dict) or "components" not in config:
        raise ModelDirError(f"{path / CONFIG_NAME}: expected a mapping with a 'components' key")
    return ModelDir(path=path, config=config, sha256=sums)



def dir_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """``(mtime_ns, inode)`` of ``path/SHA256SUMS``, ``(0, 0)`` if absent: a cache key that changes when the directory
    is rewritten (:func:`save_model_dir` publishes a new folder, hence a new SHA256SUMS), so per-process model caches
    never serve stale weights."""
    sums = Path(path) / SUMS_NAME
    st = sums.stat() if sums.is_file() else None
    return (st.st_mtime_ns, st.st_ino) if st else (0, 0)
