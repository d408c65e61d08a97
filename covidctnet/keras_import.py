"""Import official Keras (h5) weights into our PyTorch models.

Keras stores channels-last kernels: Conv2D (kh, kw, in, out), Conv3D (kd, kh, kw, in, out), Conv2DTranspose
(kh, kw, out, in), Dense (in, out). Each converter below maps one Keras model onto its PyTorch port and is tested for
numeric parity against a reference forward pass. h5py is an optional dependency (``pip install covidctnet[keras]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from covidctnet.errors import CheckpointError

__all__ = ["read_keras_h5"]


def read_keras_h5(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Read a Keras ``save_weights`` h5 file into ``{layer name: [weight arrays in Keras order]}``.

    Layers are in the file's ``layer_names`` order; layers without weights map to an empty list.

    Raises:
        CheckpointError: h5py missing, or the file is not a Keras weights file.
    """
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - depends on the install
        raise CheckpointError("reading Keras weights needs h5py: pip install 'covidctnet[keras]'") from err
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise CheckpointError(f"{path}: not a Keras weights file (no 'layer_names' attribute)")
            out: dict[str, list[np.ndarray]] = {}
            for raw in root.attrs["layer_names"]:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                group = root[name]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
                out[name] = [np.asarray(group[n]) for n in names]
            return out
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read HDF5 file: {err}") from err
