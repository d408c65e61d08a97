"""Small but valid model directories with random weights, for tests of the plumbing and the checks (not the diagnosis).

Importable from any test (``tests/`` is on ``sys.path`` through ``conftest.py``): ``from model_factories import ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SIZE, DEPTH = 64, 36
"""Default grid: 64×64 preprocessing (divisible by 8 for the BCDU-Net) and 36 slices (the 3D CNN needs at least 34)."""


def tiny_denoiser_dir(out: Path, size: int = SIZE, seed: int = 0) -> Path:
    """A valid denoiser model directory (BCDU-Net width 4) for data preprocessed at ``size``."""
    import torch

    from covidctnet.core.config import config_to_dict
    from covidctnet.core.model_dir import save_model_dir
    from covidctnet.models.bcdunet import BCDUNet
    from covidctnet.preprocessing.preprocess import PreprocessConfig

    torch.manual_seed(seed)
    net = BCDUNet(features=4)
    config = {"name": "tiny-denoiser", "preprocess": config_to_dict(PreprocessConfig(size_xy=size)),
              "input": {"size_xy": size}, "components": {"denoiser": {"arch": "bcdunet", "kwargs": net.config}}}
    save_model_dir(out, config, {"denoiser": net.state_dict()}, "# tiny test denoiser\nUntrained; tests only.\n")
    return out


def tiny_predict_model(out: Path, size: int = SIZE, depth: int = DEPTH, seed: int = 0,
                       classifier_state: dict[str, Any] | None = None,
                       denoiser_state: dict[str, Any] | None = None) -> Path:
    """A valid ``predict`` model directory (denoiser + official 3D CNN at ``depth`` x ``size`` x ``size``).

    ``classifier_state`` / ``denoiser_state`` replace the weights (e.g. with another architecture's) while
    ``config.yaml`` keeps describing the tiny architecture.
    """
    import torch

    from covidctnet.core.config import config_to_dict
    from covidctnet.core.model_dir import save_model_dir
    from covidctnet.models.bcdunet import BCDUNet
    from covidctnet.models.cnn3d import build_classifier
    from covidctnet.preprocessing.preprocess import PreprocessConfig

    torch.manual_seed(seed)
    denoiser = BCDUNet(features=4)
    classifier = build_classifier("covidctnet3d", input_size=(depth, size, size))
    config = {
        "name": "tiny-test-model",
        "preprocess": config_to_dict(PreprocessConfig(size_xy=size)),
        "input": {"depth": depth, "size_xy": size},
        "components": {"denoiser": {"arch": "bcdunet", "kwargs": denoiser.config}, "classifier": classifier.spec},
    }
    states = {"denoiser": denoiser_state if denoiser_state is not None else denoiser.state_dict(),
              "classifier": classifier_state if classifier_state is not None else classifier.state_dict()}
    save_model_dir(out, config, states, "# tiny test model\nUntrained; tests only.\n")
    return out
