"""Tests for covidctnet/classifier_training.py and `covidctnet train-classifier`.

Real data: the three shared DICOM series (covid, cap, control) are preprocessed at 40×40 in-plane and resampled to
34 slices (the smallest depth the official CNN takes: one valid conv and five 2× pools). They stand in for residual
volumes here: `covidctnet residuals` needs a trained denoiser, which a unit test cannot afford, and the point of the
fitting test is that the official CNN and the training loop can learn, whatever the input. Plumbing tests (CLI,
resume, DDP, errors) use tiny synthetic residual volumes in the same file layout.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from covidctnet.core.checkpoint import load_checkpoint
from covidctnet.core.config import load_config
from covidctnet.core.errors import CheckpointError, ConfigError, SplitError
from covidctnet.core.labels import CLASS_NAMES
from covidctnet.core.model_dir import load_model_dir, save_model_dir
from covidctnet.data.residual_volumes import (
    ResidualVolumeDataset,
    build_records,
    read_residual,
    read_split_file,
    residual_to_network_input,
)
from covidctnet.io.volume import write_nifti
from covidctnet.training.classifier import (
    ClassifierConfig,
    class_weights,
    classifier_metrics,
    make_training_step,
    train_classifier,
)
from covidctnet.training.trainer import LoopConfig, predict_dataset

REPO = Path(__file__).resolve().parents[2]
DEPTH, SIZE = 34, 40  # the official CNN needs >= 34 voxels per axis; the BCDU-Net a size divisible by 8
FIT = 34  # grid of the real-data fitting test: (34, 34, 34)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_manifest(root: Path, rows: list[dict[str, str]]) -> None:
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["study_id", "source", "label", "status", "error", "output", "sha256"])
        writer.writeheader()
        writer.writerows(rows)


def make_synthetic_residuals(root: Path, n_per_class: int = 3, size: int = SIZE, depth: int = DEPTH,
                             seed: int = 0) -> tuple[Path, Path]:
    """Tiny residual volumes (noise + a class-dependent blob) and a labels CSV with patient ids.

    Patient P0 has two studies (the seeded split must keep them together).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in (size, size, depth)), indexing="ij")
    rows, labels = [], []
    k = 0
    for label in CLASS_NAMES:
        for _ in range(n_per_class):
            sid = f"study_{k:02d}"
            vol = rng.normal(0, 0.05, (size, size, depth)).astype(np.float32)
            if label == "covid":  # bilateral diffuse signal
                vol += 0.3 * np.exp(-((np.abs(zz) - 0.5) ** 2 + yy**2 + xx**2) / 0.1).astype(np.float32)
            elif label == "cap":  # one focal blob
                vol += 0.5 * np.exp(-((zz - 0.4) ** 2 + (yy + 0.3) ** 2 + xx**2) / 0.03).astype(np.float32)
            write_nifti(vol, np.eye(4), root / f"{sid}_residual.nii.gz")
            rows.append({"study_id": sid, "source": sid, "label": "", "status": "ok", "error": "",
                         "output": f"{sid}_residual.nii.gz", "sha256": ""})
            labels.append([sid, {"control": "normal", "covid": "COVID-19", "cap": "2"}[label],
                           "P0" if k in (0, 1) else f"P{k}"])
            k += 1
    _write_manifest(root, rows)
    labels_csv = root.parent / "labels.csv"
    with open(labels_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", "label", "patient_id"])
        writer.writerows(labels)
    return root, labels_csv


def write_yaml(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


TINY = dict(depth=DEPTH, size_xy=SIZE, epochs=2, batch_size=3, lr=3e-4, val_fraction=0.34, device="cpu",
            patience=None, rotate_deg=10.0, affine_prob=0.5)


# --------------------------------------------------------------------------------------------------------------------
# config, weights, metrics


def test_yaml_equals_dataclass():
    assert load_config(ClassifierConfig, REPO / "configs" / "classifier.yaml") == ClassifierConfig()
    assert ClassifierConfig().lr == 1e-4  # the official Adam learning rate


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"val_fraction": 1.0}, {"flip_prob": 1.5}, {"patience": -1},
                                 {"epochs": 0}, {"nope": 1}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        load_config(ClassifierConfig, None, bad)


def test_class_weights():
    assert torch.allclose(class_weights([0, 1, 2, 0, 1, 2]), torch.ones(3))
    w = class_weights([0, 0, 0, 1])  # cap absent: weight 1, never used as a target
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0, 1.0]))


def test_classifier_metrics_auc_cases():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 6)
    logits = rng.normal(size=(18, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classifier_metrics(y, p)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert m["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(18), y])))
    two = y < 2
    m2 = classifier_metrics(y[two], p[two])  # cap absent: mean of the two present one-vs-rest AUCs
    expected = np.mean([roc_auc_score(y[two] == c, p[two][:, c]) for c in (0, 1)])
    assert m2["auc"] == pytest.approx(expected) and np.isnan(m2["auc_per_class"]["cap"])
    assert np.isnan(classifier_metrics(np.zeros(4, int), p[:4])["auc"])  # one class: undefined


# --------------------------------------------------------------------------------------------------------------------
# the official CNN fits the three real volumes


@pytest.fixture(scope="module")
def real_residual_dir(tmp_path_factory, dicom_dirs) -> Path:
    """The three shared DICOM series preprocessed (34×34 in-plane) and resampled to (34, 34, 34) in RAS."""
    from covidctnet.io.volume import read_volume
    from covidctnet.preprocessing.preprocess import PreprocessConfig, preprocess_volume

    root = tmp_path_factory.mktemp("real_residuals")
    rows = []
    for label, folder in dicom_dirs.items():
        array, _ = preprocess_volume(read_volume(folder), PreprocessConfig(size_xy=FIT))
        x = torch.nn.functional.interpolate(torch.from_numpy(array)[None, None], size=(FIT, FIT, FIT),
                                            mode="trilinear", align_corners=False)[0, 0].numpy()
        z_mm = array.shape[2] / FIT  # 1 mm slices of the preprocessed volume, now DEPTH slices over the same span
        write_nifti(x, np.diag([1.0, 1.0, z_mm, 1.0]), root / f"{folder.name}_residual.nii.gz")
        rows.append({"study_id": folder.name, "source": str(folder), "label": label, "status": "ok", "error": "",
                     "output": f"{folder.name}_residual.nii.gz", "sha256": ""})
    _write_manifest(root, rows)
    return root


def test_official_cnn_fits_the_three_shared_volumes(real_residual_dir, tmp_path):
    from covidctnet.core.seeding import seed_everything
    from covidctnet.models.cnn3d import build_classifier
    from covidctnet.training.trainer import Trainer

    records = build_records(real_residual_dir)  # labels from the manifest
    assert sorted(r.label_name for r in records) == sorted(CLASS_NAMES)
    ds = ResidualVolumeDataset(records, FIT, FIT)
    x = torch.stack([ds[i]["image"] for i in range(3)])
    assert x.shape == (3, 1, FIT, FIT, FIT) and float(x.std()) > 0.1  # real CT content, not blank
    seed_everything(0)
    model = build_classifier("covidctnet3d", input_size=(FIT, FIT, FIT))  # official widths, smallest grid
    trainer = Trainer(model, tmp_path / "run", train_data=ds, training_step=make_training_step(),
                      optimizer_factory=lambda p: torch.optim.Adam(p, lr=3e-4),
                      loop=LoopConfig(epochs=3, batch_size=3, device="cpu", seed=0),
                      samples_per_epoch=36)  # 12 steps of all three volumes per epoch
    result = trainer.fit()
    losses = [row["train_loss"] for row in result.history]
    assert losses[0] > 0.7  # it starts near chance (ln 3 = 1.10)
    assert losses[-1] < 0.3 * losses[0]
    # eval mode (no dropout) on the volumes it was trained on: a check that the loop learns, not a result
    m = classifier_metrics(ds.labels, predict_dataset(trainer.model, ds, "cpu", batch_size=4))
    assert m["loss"] < 0.1 and m["accuracy"] == 1.0


# --------------------------------------------------------------------------------------------------------------------
# train_classifier: resume, degenerate validation, bad input


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_resume_gives_identical_weights(tmp_path):
    res, labels = make_synthetic_residuals(tmp_path / "res")
    cfg2 = ClassifierConfig(**TINY)  # augmentation on, dropout on: both RNG streams must resume exactly
    full = train_classifier(res, tmp_path / "full", cfg2, labels=labels)
    cfg1 = ClassifierConfig(**{**TINY, "epochs": 1})
    train_classifier(res, tmp_path / "split_run", cfg1, labels=labels)  # "interrupted" after epoch 0
    with pytest.raises(CheckpointError, match="a run already exists here"):
        train_classifier(res, tmp_path / "split_run", cfg2, labels=labels)
    resumed = train_classifier(res, tmp_path / "split_run", cfg2, labels=labels, resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split_run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.epochs_run == full.epochs_run == 2
    assert (tmp_path / "full" / "split.csv").read_text() == (tmp_path / "split_run" / "split.csv").read_text()
    # no residuals.yaml here: the model dir holds the classifier alone and says so
    md = load_model_dir(tmp_path / "full" / "model")
    assert sorted(md.config["components"]) == ["classifier"] and not full.details["denoiser_bundled"]
    assert "No denoiser is bundled" in (md.path / "MODEL_CARD.md").read_text()


def test_single_class_validation_falls_back_to_val_loss(tmp_path, caplog):
    res, labels = make_synthetic_residuals(tmp_path / "res")
    split = tmp_path / "split.csv"
    rows = [[f"study_{k:02d}", "val" if k == 2 else "train"] for k in range(9)]  # val: one control study
    with open(split, "w", newline="") as fh:
        csv.writer(fh).writerows([["study_id", "split"], *rows])
    with caplog.at_level(logging.WARNING):
        out = train_classifier(res, tmp_path / "run", ClassifierConfig(**{**TINY, "epochs": 1}), labels=labels,
                               split_file=split)
    assert out.monitor == "val_loss" and np.isnan(out.val["auc"])
    assert "AUC is undefined" in caplog.text
    assert not (tmp_path / "run" / "roc.png").exists() and (tmp_path / "run" / "confusion.png").is_file()
    assert json.loads((tmp_path / "run" / "val_metrics.json").read_text())["auc"] is None
    assert "lowest validation loss" in (tmp_path / "run" / "model" / "MODEL_CARD.md").read_text()


def test_grid_mismatch_with_residuals_yaml(tmp_path):
    res, labels = make_synthetic_residuals(tmp_path / "res")
    write_yaml(res / "residuals.yaml", depth=50, size_xy=240, denoiser="nowhere")
    with pytest.raises(ConfigError, match=r"residuals\.yaml: residuals are 240x240x50 .* config says 40x40x34"):
        train_classifier(res, tmp_path / "run", ClassifierConfig(**TINY), labels=labels)
    assert not (tmp_path / "run").exists()  # nothing written


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _tiny_denoiser_dir(path: Path, size: int) -> Path:
    from covidctnet.models.bcdunet import BCDUNet

    torch.manual_seed(0)
    net = BCDUNet(features=4, dense_blocks=1)
    config = {"name": "tiny-denoiser", "components": {"denoiser": {"arch": "bcdunet", "kwargs": dict(net.config)}},
              "preprocess": {"size_xy": size, "profile": "default"}, "input": {"size_xy": size}}
    save_model_dir(path, config, {"denoiser": net.state_dict()}, "# tiny test denoiser")
    return path


def test_cli_end_to_end(tmp_path):
    from covidctnet.cli import cli
    from covidctnet.models.registry import load_classifier, load_denoiser

    res, labels = make_synthetic_residuals(tmp_path / "res")
    den = _tiny_denoiser_dir(tmp_path / "denoiser", SIZE)
    sha = load_model_dir(den).weights_sha256("denoiser")
    write_yaml(res / "residuals.yaml", denoiser=str(den), denoiser_sha256=sha, depth=DEPTH, size_xy=SIZE)
    cfg = write_yaml(tmp_path / "cfg.yaml", **{k: v for k, v in TINY.items() if k not in ("epochs", "device")})
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train-classifier", str(res), "--labels", str(labels), "-o", str(run),
                                      "--config", str(cfg), "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "validation macro AUC" in result.output
    for name in ("split.csv", "metrics.csv", "loss_curve.png", "roc.png", "confusion.png", "val_preds.csv",
                 "val_metrics.json", "config.yaml", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in metrics] == [0, 1] and {"val_auc", "val_loss", "train_loss"} <= set(metrics[0])

    split = read_split_file(run / "split.csv")
    assert split["study_00"] == split["study_01"]  # patient P0's two studies stay together
    val_ids = sorted(s for s, v in split.items() if v == "val")
    patients = {r["study_id"]: r["patient_id"] for r in csv.DictReader((run / "split.csv").open())}
    assert len({patients[s] for s in val_ids}) == 3  # one patient per class (stratified)

    md = load_model_dir(run / "model")
    assert md.config["class_names"] == list(CLASS_NAMES)
    assert md.config["components"]["classifier"]["arch"] == "covidctnet3d"
    assert md.config["input"]["depth"] == DEPTH and md.config["input"]["size_xy"] == SIZE
    assert md.config["training"]["n_val"] == len(val_ids)
    card = (md.path / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card and "Validation figures" in card and "not a test result" in card
    for name in ("classifier.safetensors", "metrics.csv", "split.csv", "SHA256SUMS", "training_config.yaml"):
        assert (md.path / name).is_file(), name

    # the denoiser that made the residuals is bundled: the model dir serves predict's whole chain
    assert md.weights_sha256("denoiser") == sha and md.config["preprocess"]["size_xy"] == SIZE
    assert load_denoiser(run / "model", device="cpu").size_xy == SIZE

    # the saved classifier reproduces the validation predictions from the residual files
    model = load_classifier(run / "model")
    preds = {r["study_id"]: r for r in csv.DictReader((run / "val_preds.csv").open())}
    assert sorted(preds) == val_ids
    x = torch.stack([residual_to_network_input(read_residual(res / f"{sid}_residual.nii.gz")) for sid in val_ids])
    with torch.no_grad():
        p = torch.softmax(model(x), 1).numpy()
    saved = np.array([[float(preds[s][f"p_{c}"]) for c in CLASS_NAMES] for s in val_ids])
    np.testing.assert_allclose(p, saved, atol=1e-5)


def test_cli_refuses_patient_in_two_sets(tmp_path):
    from covidctnet.cli import cli

    res, labels = make_synthetic_residuals(tmp_path / "res")
    split = tmp_path / "split.csv"
    rows = [["study_00", "train"], ["study_01", "val"]] + [[f"study_{k:02d}", "train"] for k in range(2, 9)]
    with open(split, "w", newline="") as fh:
        csv.writer(fh).writerows([["study_id", "split"], *rows])
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train-classifier", str(res), "--labels", str(labels), "-o", str(run),
                                      "--split-file", str(split), "--device", "cpu"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "patient 'P0' is in two sets" in lines[0] and str(split) in lines[0]
    assert "Traceback" not in result.output and not run.exists()


def test_cli_refuses_study_missing_from_residuals(tmp_path):
    from covidctnet.cli import cli

    res, labels = make_synthetic_residuals(tmp_path / "res")
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as fh:
        csv.writer(fh).writerows([["study_id", "split"], ["study_00", "train"], ["study_99", "val"]])
    result = CliRunner().invoke(cli, ["train-classifier", str(res), "--labels", str(labels), "-o",
                                      str(tmp_path / "run"), "--split-file", str(split)])
    assert result.exit_code == 2
    assert "1 listed study study_99 not among the labelled 'ok' residual volumes" in result.output


# --------------------------------------------------------------------------------------------------------------------
# DDP (torchrun, 2 CPU processes, gloo)


def test_ddp_two_processes(tmp_path):
    res, labels = make_synthetic_residuals(tmp_path / "res")
    cfg = write_yaml(tmp_path / "cfg.yaml", **{**TINY, "epochs": 1})
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        from covidctnet.cli import main
        sys.argv = ["covidctnet"] + sys.argv[1:]
        main()
    """))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2",
           str(script), "train-classifier", str(res), "--labels", str(labels), "-o", str(tmp_path / "run"),
           "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COVIDCTNET_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert (tmp_path / "run" / "model" / "classifier.safetensors").is_file()
    assert (tmp_path / "run" / "roc.png").is_file()


def test_no_validation_when_val_fraction_is_zero(tmp_path, caplog):
    """val_fraction 0 (final training on every study) is allowed: no validation outputs, and the card says so."""
    res, labels = make_synthetic_residuals(tmp_path / "res", n_per_class=1)
    cfg = ClassifierConfig(**{**TINY, "val_fraction": 0.0, "epochs": 2})
    with caplog.at_level("WARNING"):
        train_classifier(res, tmp_path / "run", cfg, labels=labels)
    assert "no validation set" in caplog.text
    assert not (tmp_path / "run" / "val_preds.csv").exists() and not (tmp_path / "run" / "roc.png").exists()
    md = load_model_dir(tmp_path / "run" / "model")
    assert md.config["training"]["n_val"] == 0 and md.config["training"]["monitor"] == "train_loss"
    assert "**None.**" in (md.path / "MODEL_CARD.md").read_text()
    # a split file without validation studies is still refused: only val_fraction 0 asks for no validation
    split = tmp_path / "split.csv"
    split.write_text("study_id,split\n" + "".join(f"study_{k:02d},train\n" for k in range(3)))
    with pytest.raises(SplitError, match="val set is empty"):
        train_classifier(res, tmp_path / "run2", cfg, labels=labels, split_file=split)


def test_medicalnet_init_builds_its_layout_and_records_it(tmp_path):
    """train-classifier --init: a MedicalNet-style checkpoint starts a 3D ResNet built in MedicalNet's layout, which the
    model directory records so that load_classifier rebuilds the same network."""
    from monai.networks import nets

    from covidctnet.models.pretrained import medicalnet_resnet_kwargs
    from covidctnet.models.registry import load_classifier

    net = nets.resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, **medicalnet_resnet_kwargs("resnet10"))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
    weights = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)  # as MedicalNet ships them
    with pytest.raises(ConfigError, match="MedicalNet weights are for the 3D ResNets"):
        ClassifierConfig(**{**TINY, "init": str(weights)})  # the official CNN has none
    res, labels = make_synthetic_residuals(tmp_path / "res", n_per_class=2)
    cfg = ClassifierConfig(**{**TINY, "arch": "resnet10", "init": str(weights), "epochs": 1, "lr": 1e-12,
                              "augment": False})
    train_classifier(res, tmp_path / "run", cfg, labels=labels)
    md = load_model_dir(tmp_path / "run" / "model")
    spec = md.config["components"]["classifier"]
    assert spec["kwargs"]["shortcut_type"] == "B" and spec["kwargs"]["conv1_t_stride"] == 2
    assert md.config["training"]["init"]["file"] == weights.name
    model = load_classifier(tmp_path / "run" / "model")
    assert torch.allclose(model.state_dict()["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"], atol=1e-6)
