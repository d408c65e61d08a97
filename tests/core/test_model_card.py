"""Model cards carry the metadata header the Hugging Face hub reads, with the figures of the model's own files; model
directories record no absolute path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from covidctnet.core.model_card import METRIC_IDS, card_metadata, split_front_matter
from covidctnet.core.model_dir import absolute_paths, load_model_dir, portable_paths, save_model_dir
from covidctnet.models.registry import DEFAULT_SLICE_MODEL, DEMO_MODEL

REQUIRED = ("license", "library_name", "tags", "datasets", "metrics", "model-index")


def _header(card: Path) -> dict:
    """The header as huggingface_hub reads it when installed (the `bundle` extra), else as plain YAML."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        return split_front_matter(card.read_text())[0]
    data = ModelCard.load(card).data.to_dict()
    return {k.replace("model_index", "model-index"): v for k, v in data.items()}


def _results(header: dict) -> list[dict]:
    return [r for entry in header["model-index"] for r in entry["results"]]


def _ci(name: str) -> tuple[float, float] | None:
    found = re.search(r"95% CI ([0-9.]+)–([0-9.]+)", name)
    return (float(found[1]), float(found[2])) if found else None


@pytest.mark.parametrize("model", [DEMO_MODEL, DEFAULT_SLICE_MODEL], ids=["demo", "slice"])
def test_bundled_cards_have_a_hub_header(model):
    header = _header(model / "MODEL_CARD.md")
    assert all(header.get(k) for k in REQUIRED), [k for k in REQUIRED if not header.get(k)]
    assert header["library_name"] == "covidctnet" and "not-a-medical-device" in header["tags"]
    assert header["license"] == "other" and header["license_name"]
    for result in _results(header):
        assert result["dataset"]["split"] and result["dataset"]["name"]
        for metric in result["metrics"]:
            assert metric["type"] in header["metrics"]
            ci = _ci(metric.get("name", ""))
            assert ci is None or ci[0] <= metric["value"] <= ci[1]


def test_slice_card_figures_are_its_out_of_fold_estimate():
    """The bundled slice model was chosen by cross-validation: its header carries the out-of-fold estimate of its
    config with the group-bootstrap CIs, not the in-sample check on the val split."""
    header = _header(DEFAULT_SLICE_MODEL / "MODEL_CARD.md")
    expected = load_model_dir(DEFAULT_SLICE_MODEL).config["cross_validation"]["expected_performance"]
    (result,) = _results(header)
    assert result["dataset"]["split"] == "out-of-fold" and f"n={int(expected['n'])}" in result["dataset"]["name"]
    by_type = {m["type"]: m for m in result["metrics"]}
    for key, value in expected.items():
        if key in METRIC_IDS:
            metric = by_type.pop(METRIC_IDS[key])
            assert metric["value"] == value
            low, high = expected[f"{key}_cluster_ci"]
            assert _ci(metric["name"]) == (round(low, 3), round(high, 3))
    assert by_type == {}  # no figure that the config does not hold


def test_demo_card_figures_are_its_table_and_the_classifier_claims_none():
    card = (DEMO_MODEL / "MODEL_CARD.md").read_text()
    header = _header(DEMO_MODEL / "MODEL_CARD.md")
    # the classifier has no validation figure (n = 0): the header must not invent a classification result
    assert load_model_dir(DEMO_MODEL).config["validation"]["n"] == 0
    assert all(r["task"]["type"] != "image-classification" for r in _results(header))
    row = next(line for line in card.splitlines() if line.startswith("| lesion_score"))
    table = [(float(v), float(lo), float(hi)) for v, lo, hi in re.findall(r"([0-9.]+) \(([0-9.]+)–([0-9.]+)\)", row)]
    figures = [(m["value"], *_ci(m["name"])) for r in _results(header) for m in r["metrics"]]
    assert figures == table and len(table) == 3


def test_save_model_dir_writes_a_header_and_no_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "covid-ct-2d"
    extra = tmp_path / "run.yaml"
    extra.write_text(f"init: {tmp_path / 'enc'}\n")
    net = torch.nn.Linear(2, 2)
    config = {"name": "m", "task": "slice", "components": {"model": {"arch": "resnet18", "kwargs": {}}},
              "training": {"data": str(data), "command": f"covidctnet train-slice {data} -o {tmp_path / 'run'}"},
              "validation": {"accuracy": 0.75, "auc": 0.8, "n": 20.0, "ci95": {"auc": {"low": 0.6, "high": 0.93,
                                                                                      "method": "DeLong"}}}}
    md = save_model_dir(tmp_path / "out", config, {"model": net.state_dict()}, f"# m\nTrained on `{data}`.\n",
                        extra_files={"training_config.yaml": extra})
    texts = {p.name: p.read_text() for p in md.path.iterdir() if p.suffix in (".yaml", ".md")}
    assert {k: absolute_paths(v) for k, v in texts.items()} == {k: [] for k in texts}
    assert md.config["training"]["command"] == "covidctnet train-slice data/covid-ct-2d -o run"
    assert yaml.safe_load(texts["training_config.yaml"]) == {"init": "enc"}
    header, body = split_front_matter(texts["MODEL_CARD.md"])
    assert body.startswith("# m") and "`data/covid-ct-2d`" in body
    assert header == card_metadata(md.config, "out") and header["datasets"] == ["covid-ct-2d"]
    metrics = {m["type"]: m for r in _results(header) for m in r["metrics"]}
    assert metrics["accuracy"]["value"] == 0.75 and metrics["roc_auc"]["name"] == "AUC (95% CI 0.600–0.930, DeLong)"
    # no validation figure: no model-index, and a header the card writer gave is kept as it is
    config.pop("validation")
    md = save_model_dir(tmp_path / "out2", config, {"model": net.state_dict()}, "---\nlicense: mit\n---\n# m\n")
    assert split_front_matter((md.path / "MODEL_CARD.md").read_text())[0] == {"license": "mit"}
    assert "model-index" not in card_metadata(md.config)


def test_portable_paths_leave_urls_and_fractions_alone(tmp_path):
    text = f"see https://x.org/a/b, and/or 16-bit / 65535, <data>/cache, {tmp_path}/run/model."
    assert portable_paths(text, tmp_path) == "see https://x.org/a/b, and/or 16-bit / 65535, <data>/cache, run/model."
    assert absolute_paths(portable_paths({"a": [str(tmp_path / "x")]}, "/")) == []
