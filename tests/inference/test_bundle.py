"""`covidctnet export-bundle`: the MONAI bundle runs under `python -m monai.bundle run` to `covidctnet predict`'s
probabilities, its metadata passes MONAI's schema, and no shipped config names an absolute path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from model_factories import tiny_denoiser_dir, tiny_predict_model
from monai.bundle import verify_metadata

from covidctnet import CLASS_NAMES
from covidctnet.cli import cli
from covidctnet.core.errors import ConfigError, ModelDirError
from covidctnet.core.files import sha256_file
from covidctnet.core.model_card import split_front_matter
from covidctnet.core.model_dir import TEXT_SUFFIXES, absolute_paths, load_model_dir, update_model_config
from covidctnet.inference.bundle import SCHEMA_FILE, SCHEMA_MD5, export_bundle, verify_bundle
from covidctnet.inference.predict import DEMO_SCAN
from covidctnet.models.registry import ASSETS, DEFAULT_SLICE_MODEL, DEMO_MODEL

REPO = Path(__file__).resolve().parents[2]


def _with_absolute_path(model: Path) -> str:
    """Record an absolute path in ``model``'s config.yaml (as models trained before this fix did) and renew its
    SHA256SUMS line; returns the path."""
    recorded = str((model.parent / "den" / "model").resolve())
    config = yaml.safe_load((model / "config.yaml").read_text())
    config["components"]["denoiser"]["source"] = {"path": recorded, "weights_sha256": "0" * 64}
    (model / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sums = [line.split("  ", 1) for line in (model / "SHA256SUMS").read_text().splitlines()]
    (model / "SHA256SUMS").write_text("".join(
        f"{sha256_file(model / name) if name == 'config.yaml' else digest}  {name}\n" for digest, name in sums))
    load_model_dir(model)
    return recorded


def _shipped_text(folder: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(folder)): absolute_paths(p.read_text()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and absolute_paths(p.read_text())}


def test_bundle_runs_under_monai_to_the_cli_probabilities(tmp_path):
    """On the bundled demo scan (a real chest CT; the small shared NIfTI holds too little lung for predict)."""
    model = tiny_predict_model(tmp_path / "tiny")
    recorded = _with_absolute_path(model)
    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["export-bundle", str(model), "-o", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "made relative: config.yaml" in result.output
    for name in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "models/SHA256SUMS",
                 "models/denoiser.safetensors", "models/classifier.safetensors"):
        assert (bundle / name).is_file(), name
    # weights copied unchanged; the rewritten config still names the same folder, relative to where we ran
    for name in ("denoiser.safetensors", "classifier.safetensors"):
        assert sha256_file(bundle / "models" / name) == sha256_file(model / name)
    copied = load_model_dir(bundle / "models").component("denoiser")["source"]["path"]
    assert recorded in (model / "config.yaml").read_text() and not Path(copied).is_absolute()
    assert (Path.cwd() / copied).resolve() == Path(recorded)
    assert _shipped_text(bundle) == {}

    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"],
                         check=False, cwd=bundle, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no input: pass --input" in run.stderr and not (bundle / "eval").exists()
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                          "--input", str(DEMO_SCAN)], check=False, cwd=bundle, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "covidctnet.inference.predict" in run.stdout  # the bundle's logging.conf shows covidctnet's lines
    bundled = json.loads((bundle / "eval" / "report.json").read_text())

    cli_out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["predict", str(DEMO_SCAN), "--model", str(model), "-o", str(cli_out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    reference = json.loads((cli_out / "report.json").read_text())
    (ours,), (theirs,) = bundled["studies"], reference["studies"]
    assert ours["status"] == theirs["status"] == "ok" and ours["predicted"] == theirs["predicted"]
    for c in CLASS_NAMES:
        assert abs(ours[f"p_{c}"] - theirs[f"p_{c}"]) <= 1e-5
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["covidctnet"]["source_weights_sha256"] == reference["weights_sha256"]
    assert meta["covidctnet"]["weights_sha256"] == bundled["weights_sha256"]


@pytest.mark.parametrize("model", [DEMO_MODEL, DEFAULT_SLICE_MODEL], ids=["demo", "slice"])
def test_bundled_models_export_and_pass_monai_verify_metadata(model, tmp_path):
    bundle = tmp_path / "bundle"
    out = export_bundle(model, bundle, bundle_version="1.2.3")
    assert out.rewritten == []  # the shipped model directories record no absolute path
    # the model identity is the source's: nothing was rewritten
    assert (bundle / "models" / "SHA256SUMS").read_bytes() == (model / "SHA256SUMS").read_bytes()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] == "1.2.3" and meta["network_data_format"]["outputs"]["pred"]["num_channels"] == (
        2 if model == DEFAULT_SLICE_MODEL else 3)
    # MONAI's own check, offline: the schema file given as `filepath` exists, so nothing is downloaded
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5)
    header, body = split_front_matter((bundle / "docs" / "README.md").read_text())
    assert header == split_front_matter((model / "MODEL_CARD.md").read_text())[0]
    assert "python -m monai.bundle run" in body
    assert _shipped_text(bundle) == {}


def test_verify_bundle_refuses_bad_metadata_and_absolute_paths(tmp_path):
    bundle = tmp_path / "bundle"
    export_bundle(DEMO_MODEL, bundle)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "network_data_format"}))
    with pytest.raises(ConfigError, match="network_data_format"):
        verify_bundle(bundle)
    meta_file.write_text(json.dumps(meta))
    verify_bundle(bundle)
    inference = bundle / "configs" / "inference.json"
    inference.write_text(inference.read_text().replace('"eval"', f'"{tmp_path / "eval"}"'))
    with pytest.raises(ConfigError, match="absolute paths"):
        verify_bundle(bundle)


def test_export_refuses_what_it_cannot_bundle(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an earlier bundle"):
        export_bundle(DEMO_MODEL, other)
    assert (other / "keep.txt").read_text() == "mine"
    den = tmp_path / "den"
    tiny_denoiser_dir(den)
    result = CliRunner().invoke(cli, ["export-bundle", str(den), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "a bundle needs a predict model directory" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    with pytest.raises(ModelDirError):
        export_bundle(tmp_path / "missing", tmp_path / "b")


def test_no_shipped_config_names_an_absolute_path():
    """The bundled model directories and the package's configs name no folder of the machine that made them."""
    found = {**{f"assets/{k}": v for k, v in _shipped_text(ASSETS).items()},
             **{f"configs/{k}": v for k, v in _shipped_text(REPO / "configs").items()}}
    assert found == {}


def test_a_non_default_grid_is_described_as_recorded(tmp_path):
    model = tiny_predict_model(tmp_path / "m", size=40, depth=36)  # neither the official 128 nor 50
    # the grid recorded by the network only (input_size), as a Keras import or an older directory records it
    update_model_config(model, {"input": {"size_xy": 40}})
    export_bundle(model, tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["classifier_data_format"]["inputs"]["image"]["spatial_shape"] == [36, 40, 40]
    assert meta["denoiser_data_format"]["inputs"]["image"]["spatial_shape"] == [40, 40]
