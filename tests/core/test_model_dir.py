"""ModelDirConfig: one validated config.yaml schema for every model kind; older directories still load."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from covidctnet.core.errors import ModelDirError
from covidctnet.core.files import sha256_file
from covidctnet.core.model_dir import (
    ComponentEntry,
    ModelDirConfig,
    cached_by_model_dir,
    classifier_grid,
    load_model_dir,
    save_model_dir,
    update_model_config,
)
from covidctnet.models.registry import DEFAULT_SLICE_MODEL, DEMO_MODEL

SLICE = {"name": "s", "task": "slice", "threshold": 0.5, "components": {"model": {"arch": "resnet18", "kwargs": {}}}}


def test_bundled_models_load_in_the_current_schema(tmp_path):
    raw = yaml.safe_load((DEFAULT_SLICE_MODEL / "config.yaml").read_text())
    md = load_model_dir(DEFAULT_SLICE_MODEL)
    assert md.spec.components["model"].members == 5 and md.spec.threshold == raw["threshold"]
    assert md.spec.extra["positive_class"] == "covid"  # kind-specific keys are kept as written
    # a directory written before the schema (`classes`, `preprocessing`) still loads, read in the current names
    shutil.copytree(DEFAULT_SLICE_MODEL, tmp_path / "old")
    cfg, sums = tmp_path / "old" / "config.yaml", tmp_path / "old" / "SHA256SUMS"
    legacy = {("classes" if k == "class_names" else "preprocessing" if k == "preprocess" else k): v
              for k, v in raw.items()}
    cfg.write_text(yaml.safe_dump(legacy, sort_keys=False))
    sums.write_text("".join(f"{sha256_file(cfg)}  config.yaml\n" if line.endswith("config.yaml") else line + "\n"
                            for line in sums.read_text().splitlines()))
    old = load_model_dir(tmp_path / "old")
    assert old.config["class_names"] == raw["class_names"] and old.config["preprocess"] == raw["preprocess"]
    assert "classes" not in old.config and "preprocessing" not in old.config
    demo = load_model_dir(DEMO_MODEL).spec
    assert demo.task == "covidctnet" and set(demo.components) == {"classifier", "denoiser", "lesion"}
    assert demo.components["denoiser"].source["weights_sha256"] and demo.components["lesion"].source["weights_sha256"]
    assert demo.extra["evidence"] == "lesion"  # the classifier reads the lesion model's maps


def test_round_trip_and_weights_filled_in(tmp_path):
    spec = ModelDirConfig("m", "denoise", {"denoiser": ComponentEntry("bcdunet", {"features": 4})},
                          preprocess={"size_xy": 64}, extra={"note": 1})
    md = save_model_dir(tmp_path / "m", spec, {"denoiser": {"w": torch.zeros(2)}}, "# card")
    assert md.spec == ModelDirConfig("m", "denoise", {"denoiser": ComponentEntry("bcdunet", {"features": 4},
                                                                                 "denoiser.safetensors")},
                                     preprocess={"size_xy": 64}, extra={"note": 1})
    assert list(md.config) == ["name", "task", "components", "preprocess", "note"]


def test_legacy_dict_is_written_in_the_current_schema(tmp_path):
    legacy = {**SLICE, "classes": ["noncovid", "covid"], "preprocessing": {"size": 64}}
    save_model_dir(tmp_path / "m", legacy, {"model": {"w": torch.zeros(1)}}, "")
    written = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    assert written["class_names"] == ["noncovid", "covid"] and written["preprocess"] == {"size": 64}
    assert "classes" not in written and "preprocessing" not in written


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "segment"}, r"'task' must be one of"),
    ({"threshold": 1.5}, r"'threshold' must be a number in \[0, 1\]"),
    ({"components": {}}, r"'components' mapping with at least one network"),
    ({"components": {"model": {"kwargs": {}}}}, r"components.model: 'arch' must be"),
    ({"components": {"model": {"arch": "resnet18", "kwarg": {}}}}, r"components.model: unknown key\(s\) \['kwarg'\]"),
    ({"components": {"model": {"arch": "resnet18", "members": 1}}}, r"'members' must be an integer >= 2"),
    ({"class_names": "covid"}, r"'class_names' must be a list"),
    ({"preprocess": {"size": 1}, "preprocessing": {"size": 1}}, r"both 'preprocessing' and 'preprocess'"),
])
def test_bad_configs_are_refused_with_the_key_named(change, message):
    with pytest.raises(ModelDirError, match=message):
        ModelDirConfig.from_dict({**SLICE, **change}, "config.yaml")


def test_weights_and_components_must_match(tmp_path):
    with pytest.raises(ModelDirError, match=r"weights for \['other'\] but no such component"):
        save_model_dir(tmp_path / "m", SLICE, {"model": {"w": torch.zeros(1)}, "other": {"w": torch.zeros(1)}}, "")
    with pytest.raises(ModelDirError, match=r"no weights given for component\(s\) \['model'\]"):
        save_model_dir(tmp_path / "m", SLICE, {}, "")
    assert not (tmp_path / "m").exists()


def test_name_defaults_to_the_folder(tmp_path):
    md = save_model_dir(tmp_path / "my-model", {k: v for k, v in SLICE.items() if k != "name"},
                        {"model": {"w": torch.zeros(1)}}, "")
    assert "name" not in md.config and md.name == "my-model"


def test_bad_schema_fails_on_load_even_with_matching_hashes(tmp_path):
    shutil.copytree(DEFAULT_SLICE_MODEL, tmp_path / "m")
    cfg, sums = tmp_path / "m" / "config.yaml", tmp_path / "m" / "SHA256SUMS"
    cfg.write_text(cfg.read_text().replace("task: slice", "task: nonsense"))
    with pytest.raises(ModelDirError, match="config was edited"):  # the hash guards the file first
        load_model_dir(tmp_path / "m")
    # whoever rewrites SHA256SUMS too still meets the schema
    lines = [f"{sha256_file(cfg)}  config.yaml" if line.endswith("config.yaml") else line
             for line in sums.read_text().splitlines()]
    sums.write_text("\n".join(lines) + "\n")
    with pytest.raises(ModelDirError, match=r"'task' must be one of"):
        load_model_dir(tmp_path / "m")


def test_update_model_config_rewrites_config_and_its_hash_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(DEFAULT_SLICE_MODEL, tmp_path / "m")
    m = tmp_path / "m"
    before = {p.name: sha256_file(p) for p in m.iterdir()}
    raw = yaml.safe_load((m / "config.yaml").read_text())
    md = update_model_config(m, {"note": {"made_by": str(tmp_path / "x" / "run")}, "threshold": 0.25})
    after = {p.name: sha256_file(p) for p in m.iterdir()}
    assert {n for n in before if before[n] != after[n]} == {"config.yaml", "SHA256SUMS"}
    new = yaml.safe_load((m / "config.yaml").read_text())
    assert new == {**raw, "note": {"made_by": "x/run"}, "threshold": 0.25}  # a path made portable (cwd: tmp_path)
    assert list(new)[: len(raw)] == list(raw)  # the keys keep their order
    assert md.config["threshold"] == 0.25 and load_model_dir(m).sha256["config.yaml"] == after["config.yaml"]
    md.state_dict("model")  # weights still match their hash
    with pytest.raises(ModelDirError, match="'threshold' must be a number"):
        update_model_config(m, {"threshold": 3})
    assert sha256_file(m / "config.yaml") == after["config.yaml"]  # a refused update leaves the directory as it was
    (m / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(ModelDirError, match="does not match SHA256SUMS"):
        update_model_config(m, {"threshold": 0.3})


def test_classifier_grid_from_input_size_or_the_input_block(tmp_path):
    conv = {"components": {"classifier": {"arch": "covidctnet3d", "kwargs": {"input_size": [36, 64, 64]}}},
            "input": {"depth": 50, "size_xy": 128}}
    assert classifier_grid(conv) == (36, 64, 64)  # the network's own record wins
    monai = {"components": {"classifier": {"arch": "resnet10", "kwargs": {}}}, "input": {"depth": 40, "size_xy": 96}}
    assert classifier_grid(monai) == (40, 96, 96)
    with pytest.raises(ModelDirError, match="input_size .* is not recorded"):
        classifier_grid({"components": {"classifier": {"arch": "resnet10"}}}, "m")
    with pytest.raises(ModelDirError, match="no classifier component"):
        classifier_grid({"components": {}}, "m")
    md = load_model_dir(DEMO_MODEL)
    assert md.classifier_grid() == classifier_grid(md.config, md.path)
    assert md.sums_sha256 == sha256_file(DEMO_MODEL / "SHA256SUMS")


def test_cached_by_model_dir_loads_once_and_again_when_rewritten(tmp_path):
    shutil.copytree(DEFAULT_SLICE_MODEL, tmp_path / "m")
    m, loads = tmp_path / "m", []

    @cached_by_model_dir(maxsize=2)
    def load(path, device="cpu"):
        loads.append((path, device))
        return object()

    first = load(m)
    assert load(str(m)) is first and loads == [(str(m), "cpu")]  # a Path and its str are one directory
    assert load(m, "cuda") is not first and len(loads) == 2  # other arguments: another entry
    update_model_config(m, {"threshold": 0.25})  # publishes a new SHA256SUMS
    assert load(m) is not first and len(loads) == 3
    load.cache_clear()
    load(m)
    assert len(loads) == 4
