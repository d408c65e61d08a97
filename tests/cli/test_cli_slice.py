"""CLI tests of train-slice, pretrain-slice and predict-slice (click CliRunner), with the bundled slice model."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from covidctnet.cli import cli
from covidctnet.data.ucsd import read_split_list, ucsd_records
from covidctnet.models.registry import DEFAULT_SLICE_MODEL
from covidctnet.training.slice import slice_metrics

REPO = Path(__file__).resolve().parents[2]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def val_images(ucsd_root) -> list[Path]:
    records = ucsd_records(ucsd_root, "val")
    return [r.path for r in records if r.label == 1][:2] + [r.path for r in records if r.label == 0][:2]


def test_help_lists_commands_and_stays_light():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("train-slice", "pretrain-slice", "predict-slice", "ensemble-slice"):
        assert name in result.output
    code = ("import sys, covidctnet.cli.train_slice, covidctnet.cli.pretrain_slice, covidctnet.cli.predict_slice, "
            "covidctnet.cli.ensemble_slice; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bundled_model_is_a_small_slice_model_dir():
    from covidctnet.core.model_dir import load_model_dir

    md = load_model_dir(DEFAULT_SLICE_MODEL)
    assert md.config["task"] == "slice" and md.config["class_names"] == ["noncovid", "covid"]
    size = sum(p.stat().st_size for p in DEFAULT_SLICE_MODEL.iterdir())
    assert size < 16_000_000  # 5 quarter-width ResNet-18s of about 2.8 MB
    card = (DEFAULT_SLICE_MODEL / "MODEL_CARD.md").read_text()
    assert "covidctnet cv-slice" in card and "not a medical device" in card and "out-of-fold" in card
    assert "/work/" not in (DEFAULT_SLICE_MODEL / "config.yaml").read_text()  # no absolute path ships


def test_predict_slice_format_with_bundled_model(val_images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict-slice", *map(str, val_images), str(bad), "-o", str(out)])
    assert result.exit_code == 1, result.output  # one image failed, the others were scored
    assert [p.name for p in out.iterdir()] == ["preds.csv"]
    notes = [line for line in result.output.splitlines() if "demonstration" in line]
    assert len(notes) == 1 and "not diagnostic" in notes[0]  # the bundled model says what it is
    rows = _rows(out / "preds.csv")
    bundled = yaml.safe_load((DEFAULT_SLICE_MODEL / "config.yaml").read_text())
    threshold = bundled["threshold"]
    sums = hashlib.sha256((DEFAULT_SLICE_MODEL / "SHA256SUMS").read_bytes()).hexdigest()
    assert list(rows[0]) == ["file", "p_covid", "predicted", "status", "error", "model", "weights_sha256", "threshold"]
    assert [r["file"] for r in rows] == [*map(str, val_images), str(bad)]
    for r in rows:  # provenance on every row, error rows too
        assert r["model"] == bundled["name"] and r["weights_sha256"] == sums
        assert float(r["threshold"]) == threshold
    for r in rows[:4]:
        p = float(r["p_covid"])
        assert 0.0 <= p <= 1.0 and r["status"] == "ok" and r["error"] == ""
        assert r["predicted"] == ("covid" if p >= threshold else "noncovid")
    assert rows[4]["status"] == "error" and "broken.png" in rows[4]["error"] and rows[4]["p_covid"] == ""
    assert sum(line.startswith("Error:") and "broken.png" in line for line in result.output.splitlines()) == 1


def test_predict_slice_then_evaluate_on_the_val_split(ucsd_root, tmp_path):
    """predict-slice on the validation split gives the figures recorded when the model was written (in-sample for
    the cross-validated bundle: a consistency check, not a performance estimate), and evaluate
    takes its preds.csv and a UCSD-style file,label CSV made from the split lists as they are, deciding at the
    model's threshold as predict-slice did."""
    cfg = yaml.safe_load((DEFAULT_SLICE_MODEL / "config.yaml").read_text())
    out = tmp_path / "val"
    files = [str(r.path) for r in ucsd_records(ucsd_root, "val")]
    result = CliRunner().invoke(cli, ["predict-slice", *files, "-o", str(out), "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "preds.csv")
    assert len(rows) == 118
    labels = np.array([1 if "/CT_COVID/" in r["file"] else 0 for r in rows])
    m = slice_metrics(labels, np.array([float(r["p_covid"]) for r in rows]), cfg["threshold"])
    for key in ("accuracy", "f1", "auc"):
        assert m[key] == pytest.approx(cfg["in_sample_check"][key], abs=1e-3), key

    # labels as the split lists give them: relative paths for COVID, bare names (e.g. 21%0.jpg) for NonCOVID
    lines = ["file,label"]
    for cls, folder, label in (("COVID", "CT_COVID", "covid"), ("NonCOVID", "CT_NonCOVID", "noncovid")):
        for name in read_split_list(ucsd_root / "Data-split" / cls / f"val{folder}.txt"):
            lines.append(f"{folder}/{name},{label}" if cls == "COVID" else f"{name},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    fast = tmp_path / "fast.yaml"
    fast.write_text("n_bootstrap: 100\nroc_band: false\n")
    report = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", str(out / "preds.csv"), "--labels", str(tmp_path / "labels.csv"),
                                      "-o", str(report), "--config", str(fast)])
    assert result.exit_code == 0, result.output
    assert "118 cases evaluated" in result.stdout
    assert f"threshold {cfg['threshold']:.6g} (the threshold column of preds.csv)" in result.stdout
    metrics = json.loads((report / "metrics.json").read_text())
    two = metrics["two_class"]["metrics"]
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        assert two[key]["value"] == pytest.approx(cfg["in_sample_check"][key], abs=1e-3), key
    assert metrics["inputs"]["weights_sha256"] == rows[0]["weights_sha256"]


def test_predict_slice_folder_and_cam(val_images, tmp_path):
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for p in val_images[:2]:
        shutil.copyfile(p, folder / p.name)
    (folder / "readme.txt").write_text("not an image, not picked up from a folder")
    out, cams = tmp_path / "out", tmp_path / "cam"
    result = CliRunner().invoke(cli, ["predict-slice", str(tmp_path / "imgs"), "-o", str(out), "--cam", str(cams),
                                      "--model", str(DEFAULT_SLICE_MODEL)])
    assert result.exit_code == 0, result.output
    assert len(_rows(out / "preds.csv")) == 2
    pngs = sorted(cams.glob("*_cam.png"))
    assert [p.name for p in pngs] == sorted(f"{p.stem}_cam.png" for p in val_images[:2])
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_predict_slice_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    result = CliRunner().invoke(cli, ["predict-slice", str(bad), "-o", str(tmp_path / "p"), "--cam",
                                      str(tmp_path / "cams")])
    assert result.exit_code == 2  # every image failed: one Error line naming it, and no output folder
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "bad.jpg" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "cams").exists()
    result = CliRunner().invoke(cli, ["predict-slice", str(bad), "-o", str(tmp_path / "q"), "--model",
                                      str(tmp_path)])
    assert result.exit_code == 2 and "Error:" in result.output and "config.yaml missing" in result.output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["--threshold", "-0.2"], "--threshold must be in [0, 1]"),
    (["--threshold", "nan"], "--threshold must be in [0, 1]"),
    (["--batch-size", "0"], "batch size must be at least 1"),
], ids=["above-1", "negative", "nan", "batch-0"])
def test_predict_slice_bad_options_one_line_exit_2(val_images, tmp_path, args, fragment):
    result = CliRunner().invoke(cli, ["predict-slice", str(val_images[0]), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_predict_slice_out_must_be_a_folder(val_images, tmp_path):
    existing = tmp_path / "preds.csv"
    existing.write_text("keep me\n")
    result = CliRunner().invoke(cli, ["predict-slice", str(val_images[0]), "-o", str(existing)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(existing) in lines[0] and "must be a folder" in lines[0], result.stderr
    assert existing.read_text() == "keep me\n"
    result = CliRunner().invoke(cli, ["predict-slice", str(val_images[0]), "-o", str(tmp_path / "new") + "/"])
    assert result.exit_code == 0, result.output  # `-o outdir/` is a folder, created, with preds.csv in it
    assert (tmp_path / "new" / "preds.csv").is_file()


def test_train_slice_cli_errors(tmp_path, ucsd_root):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sise: 64\n")
    result = CliRunner().invoke(cli, ["train-slice", str(ucsd_root), "-o", str(tmp_path / "r"), "--config", str(cfg)])
    assert result.exit_code == 2 and "unknown key(s) ['sise']" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["train-slice", str(empty), "-o", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "Error:" in result.output and "no train folder" in result.output
    assert "Traceback" not in result.output


def test_train_slice_cli_tiny_run(ucsd_root, tmp_path):
    root = tmp_path / "mini"
    for cls, folder in (("COVID", "CT_COVID"), ("NonCOVID", "CT_NonCOVID")):
        (root / folder).mkdir(parents=True)
        (root / "Data-split" / cls).mkdir(parents=True)
        for split, n in (("train", 4), ("val", 3)):
            names = read_split_list(ucsd_root / "Data-split" / cls / f"{split}CT_{cls}.txt")[:n]
            for name in names:  # real images, shrunk so that the run takes seconds
                with Image.open(ucsd_root / folder / name) as im:
                    im.thumbnail((96, 96))
                    im.save(root / folder / name, format=im.format or ("JPEG" if name.endswith(".jpg") else "PNG"))
            (root / "Data-split" / cls / f"{split}CT_{cls}.txt").write_text("\r\n".join(names))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("width: 0.25\nbatch_size: 4\n")
    args = ["train-slice", str(root), "-o", str(tmp_path / "run"), "--config", str(cfg), "--size", "48", "--epochs",
            "1", "--device", "cpu", "--lung-mask"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["size"] == 48 and saved["lung_mask"] is True and saved["width"] == 0.25  # YAML + options merged
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--resume" in result.output  # an existing run is never overwritten
    out = tmp_path / "p"
    img = ucsd_records(root, "val")[0].path
    result = CliRunner().invoke(cli, ["predict-slice", str(img), "-o", str(out), "--model", str(tmp_path / "run" /
                                                                                                  "model")])
    assert result.exit_code == 0 and _rows(out / "preds.csv")[0]["status"] == "ok"
