"""Weights never run code: checkpoints are read with ``torch.load(weights_only=True)``, model weights with safetensors,
and model directories are hash-checked.

A pickle whose unpickling would create a marker file is planted where each command reads weights; the command must
refuse it with one line, and the marker must not exist. (A weights file that does not match ``SHA256SUMS`` is
``tests/inference/test_predict.py::test_tampered_weights_are_refused``; here the attacker also rewrites ``SHA256SUMS``.)
"""

from __future__ import annotations

import ast
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from robust_cases import (
    Workspace,
    assert_one_line_error,
    denoiser_run,
    invoke,
    invoke_ok,
    session_dir,
    snapshot,
    write_csv,
)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Payload:
    """Unpickling this opens (creates) ``marker`` for writing: a stand-in for arbitrary code in a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(path: Path, marker: Path, checkpoint_like: bool = True) -> None:
    """Write a pickle at ``path`` holding the payload (inside a dict shaped like a trainer checkpoint)."""
    payload = _Payload(marker)
    obj = ({"format": 1, "epoch": 0, "model": payload, "optimizer": {}, "best_metric": 0.0, "history": [], "rng": []}
           if checkpoint_like else {"weight": payload})
    torch.save(obj, path)


def _assert_payload_is_live(path: Path, marker: Path) -> None:
    """The planted file really runs code when unpickled unsafely (so the refusal above is meaningful)."""
    assert not marker.exists()
    copy = path.with_name("unsafe-probe.pt")  # torch.load reads a *.safetensors name as safetensors
    shutil.copyfile(path, copy)
    torch.load(copy, weights_only=False)
    assert marker.exists()


def _classifier_run(factory: pytest.TempPathFactory, ws: Workspace) -> Path:
    def build(root: Path) -> None:
        ids = ws.ids
        split = write_csv(root / "split.csv", ["study_id", "split"],
                          [[ids["covid"], "train"], [ids["cap"], "train"], [ids["control"], "val"]])
        invoke_ok("train-classifier", ws.residuals, "--labels", ws.labels, "--split-file", split, "-o", root / "run",
                  "--config", ws.grid_config, "--device", "cpu")

    return session_dir(factory, "classifier-run", build) / "run"


def _assert_resume_refuses_pickle(finished_run: Path, tmp_path: Path, *args: Any) -> None:
    """A copy of ``finished_run`` whose ``checkpoints/last.pt`` is a code-running pickle: the command ``args``
    (``-o RUN`` is appended) refuses it in one line, runs no code and changes nothing in the run folder."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker, last = tmp_path / "code-ran", run / "checkpoints" / "last.pt"
    _plant_pickle(last, marker)
    before = snapshot(run)
    result = invoke(*args, "-o", run)
    assert_one_line_error(result, last, r"refused, the file holds Python objects other than tensors")
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert snapshot(run) == before
    _assert_payload_is_live(last, marker)


def test_pickle_checkpoint_refused_by_train_denoiser(ws, tmp_path, tmp_path_factory):
    _assert_resume_refuses_pickle(denoiser_run(tmp_path_factory, ws), tmp_path,
                                  "train-denoiser", ws.pre, "--resume", "--epochs", 2, "--device", "cpu")


def test_pickle_checkpoint_refused_by_train_classifier(ws, tmp_path, tmp_path_factory):
    _assert_resume_refuses_pickle(_classifier_run(tmp_path_factory, ws), tmp_path,
                                  "train-classifier", ws.residuals, "--labels", ws.labels, "--config", ws.grid_config,
                                  "--epochs", 2, "--resume", "--device", "cpu")


def _rehash(model: Path) -> None:
    """Rewrite SHA256SUMS to match the (tampered) files, as an attacker who can write the folder would."""
    names = [line.split("  ", 1)[1] for line in (model / "SHA256SUMS").read_text().splitlines() if line.strip()]
    (model / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((model / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


def test_pickle_as_model_weights_refused_by_predict(ws, dicom_dirs, tmp_path):
    """A torch pickle in place of classifier.safetensors, with SHA256SUMS rewritten to match: safetensors cannot
    parse it, so predict refuses the model directory and nothing is unpickled."""
    model = tmp_path / "model"
    shutil.copytree(ws.model, model)
    marker = tmp_path / "code-ran"
    _plant_pickle(model / "classifier.safetensors", marker, checkpoint_like=False)
    _rehash(model)
    out = tmp_path / "out"
    result = invoke("predict", dicom_dirs["cap"], "--model", model, "-o", out, "--device", "cpu")
    assert_one_line_error(result, model / "classifier.safetensors", r"cannot read safetensors weights")
    assert not marker.exists() and not out.exists()
    _assert_payload_is_live(model / "classifier.safetensors", marker)


def test_edited_model_config_refused_by_predict(ws, dicom_dirs, tmp_path):
    """config.yaml is hashed too: pointing the classifier at other settings without re-signing is refused."""
    model = tmp_path / "model"
    shutil.copytree(ws.model, model)
    config = yaml.safe_load((model / "config.yaml").read_text())
    config["preprocess"]["hu_max"] = 3000.0
    (model / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    result = invoke("predict", dicom_dirs["cap"], "--model", model, "-o", out, "--device", "cpu")
    assert_one_line_error(result, model / "config.yaml", r"sha256 does not match SHA256SUMS; the config was edited")
    assert not out.exists()


def _unsafe_loads(path: Path) -> list[str]:
    """Calls in a source file that could unpickle: torch.load without weights_only=True, pickle/dill/joblib loads,
    numpy loads with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n in ("pickle", "dill", "joblib")]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = ast.unparse(node.func.value)
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if node.func.attr == "load" and owner == "torch" and kwargs.get("weights_only") != "True":
            found.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
        if node.func.attr == "load" and owner in ("np", "numpy") and kwargs.get("allow_pickle") == "True":
            found.append(f"{path.name}:{node.lineno} numpy load with allow_pickle=True")
    return found


def test_library_never_unpickles_weights(tmp_path):
    files = sorted((REPO / "covidctnet").rglob("*.py")) + sorted((REPO / "cli").rglob("*.py"))
    assert len(files) > 20
    assert [p for f in files for p in _unsafe_loads(f)] == []
    # the scan does see unsafe calls
    probe = tmp_path / "probe.py"
    probe.write_text("import pickle\nimport torch\nimport numpy as np\ntorch.load(p)\n"
                     "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
                     "torch.load(p, weights_only=True)\n")
    assert len(_unsafe_loads(probe)) == 4
