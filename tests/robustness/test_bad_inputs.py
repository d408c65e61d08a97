"""The bad-input corpus of issue 9, each kind run through the command a user would type.

Every kind is made in the test from the real shared scans (see ``robust_cases.py``) and must give: exit code 2 (1 for a
batch in which only some studies failed), exactly one ``Error:`` line naming the file and the problem, no traceback,
and no output left behind for the bad study. Unit-level checks of the same errors live next to their modules
(``tests/io/test_volume.py``, ``io/test_checks.py``, ``training/test_trainer.py`` ...); this file proves them end to
end at the CLI.
Config validation is in ``test_configs.py``, weights safety in ``test_safe_loading.py``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from robust_cases import (
    CONTROL,
    DEPTH,
    SCAN_CASES,
    SIZE,
    Sources,
    assert_one_line_error,
    denoiser_run,
    error_lines,
    invoke,
    invoke_ok,
    session_dir,
    snapshot,
    tiny_predict_model,
    two_series_folder,
    write_csv,
)

from covidctnet.io.batch import read_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------------------------
# bad scans: alone (exit 2, nothing written) and all together in one batch with a good scan (exit 1)


@pytest.mark.parametrize("kind", list(SCAN_CASES))
def test_bad_scan_alone(kind, sources, tmp_path):
    """`covidctnet preprocess BAD -o OUT`: one line naming BAD and the problem, exit 2, OUT never created."""
    case = SCAN_CASES[kind]
    path = case.build(sources, tmp_path)
    out = tmp_path / "out"
    result = invoke("preprocess", path, "-o", out, "--size", SIZE)
    assert_one_line_error(result, path, case.problem)
    assert not out.exists()


# A folder holding no study at all is refused before the batch starts (a usage error, not a bad study).
BATCH_KINDS = [k for k in SCAN_CASES if k != "folder-without-dicom"]


def _bad_batch(sources: Sources, tmp: Path) -> dict[str, Path]:
    folder = tmp / "in"
    folder.mkdir()
    return {kind: SCAN_CASES[kind].build(sources, folder) for kind in BATCH_KINDS}


def _assert_each_bad_study_named_once(result: Any, bad: dict[str, Path]) -> None:
    unexpected = result.exception if not isinstance(result.exception, SystemExit) else None
    assert unexpected is None and "Traceback" not in result.output, result.output
    assert result.exit_code == 1, result.output
    lines = error_lines(result)
    assert len(lines) == len(bad), "\n".join(lines)
    for kind, path in bad.items():
        mine = [line for line in lines if str(path) in line]
        assert len(mine) == 1, (kind, lines)
        assert re.search(SCAN_CASES[kind].problem, mine[0]), (kind, mine)


def test_preprocess_batch_records_every_bad_scan(sources, tmp_path):
    """All bad scans and one good one in a single run: the good one is written, each bad one is one line and one
    manifest row, and no file (not even a temp file) is left for a bad study."""
    bad = _bad_batch(sources, tmp_path)
    out = tmp_path / "out"
    result = invoke("preprocess", sources.nifti, *bad.values(), "-o", out, "--size", SIZE)
    _assert_each_bad_study_named_once(result, bad)
    rows = {r["study_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert len(rows) == len(bad) + 1
    good = rows.pop("totalseg_example_ct_sm")
    assert good["status"] == "ok" and (out / good["output"]).is_file()
    for row in rows.values():
        assert row["status"] == "error" and row["error"] and row["output"] == "" and row["sha256"] == ""
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "preprocess.yaml", "totalseg_example_ct_sm.nii.gz"]


def test_predict_batch_records_every_bad_scan(sources, ws, tmp_path):
    """The same corpus through `covidctnet predict --save-residuals`: only the good scan gets a residual and an
    overlay; the report has an error row (with the one-line message) for each bad scan. The good scan is a chest CT
    (the abdomen NIfTI that `preprocess` accepts is refused by predict's chest-coverage check, tested below)."""
    bad = _bad_batch(sources, tmp_path)
    out = tmp_path / "out"
    result = invoke("predict", sources.dicom["control"], *bad.values(), "--model", ws.model, "-o", out,
                    "--save-residuals", "--device", "cpu")
    _assert_each_bad_study_named_once(result, bad)
    report = {r["study_id"]: r for r in json.loads((out / "report.json").read_text())["studies"]}
    good = report.pop("control-normal001")
    assert good["status"] == "ok" and good["predicted"] in ("control", "covid", "cap")
    assert all(r["status"] == "error" and r["error"] and r["p_covid"] == "" for r in report.values())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "control-normal001_overlay.png", "control-normal001_residual.nii.gz", "manifest.csv",
        "predictions/control-normal001.json", "report.csv", "report.html", "report.json"]


def test_predict_refuses_a_non_chest_scan(sources, ws, tmp_path):
    """The abdomen CT (TotalSegmentator example_ct_sm, 123 ml of lung bases) gets one line, exit 2, no output."""
    out = tmp_path / "out"
    result = invoke("predict", sources.nifti, "--model", ws.model, "-o", out, "--save-residuals", "--device", "cpu")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and f"{sources.nifti}: no lungs found: not a chest CT? (lung volume" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# a folder with two series is not an error (by design): the CT series with the most slices is read, with a warning


def test_two_series_takes_the_largest_and_series_uid_is_honoured(sources, tmp_path, caplog):
    folder, big_uid, small_uid = two_series_folder(sources, tmp_path)
    caplog.set_level(logging.WARNING, logger="covidctnet.io.dicom")
    result = invoke_ok("preprocess", folder, "-o", tmp_path / "out", "--size", SIZE)
    assert "Traceback" not in result.output and not error_lines(result)
    (row,) = read_manifest(tmp_path / "out" / "manifest.csv")
    assert row["status"] == "ok" and row["input_shape"] == "512x512x20"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 series found; using the CT series with the most slices (20 files)" in w for w in warnings), warnings
    # --series-uid picks the other series: its 12 slices are then refused as too few (proof it was the one read)
    out = tmp_path / "small"
    assert_one_line_error(invoke("preprocess", folder, "-o", out, "--series-uid", small_uid, "--size", SIZE),
                          folder, r"\b12 slices; at least 16")
    assert not out.exists()
    # explicitly asking for the large one works like the default
    invoke_ok("preprocess", folder, "-o", tmp_path / "big", "--series-uid", big_uid, "--size", SIZE)
    default, chosen = (tmp_path / d / "two_series.nii.gz" for d in ("out", "big"))
    assert chosen.read_bytes() == default.read_bytes()


# --------------------------------------------------------------------------------------------------------------------
# bad inputs of the other commands


@dataclass
class CommandCase:
    """One bad invocation: the arguments, the file the error must name, the problem (regex), the paths that must not
    exist afterwards and a folder that must be left byte-for-byte unchanged."""

    args: list[Any]
    culprit: Path | str
    problem: str
    absent: tuple[Path, ...] = ()
    unchanged: Path | None = None


def _pre60(factory: pytest.TempPathFactory, sources: Sources) -> Path:
    """The real control series preprocessed at 60x60: valid data, but not a size the BCDU-Net can take."""

    def build(root: Path) -> None:
        invoke_ok("preprocess", sources.dicom["control"], "-o", root / "pre", "--size", 60)

    return session_dir(factory, "pre60", build) / "pre"


def _copy_run(run: Path, tmp: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(run, dst)
    return dst


def case_unknown_series_uid(ws, sources, tmp, factory) -> CommandCase:
    folder, _, _ = two_series_folder(sources, tmp)
    out = tmp / "out"
    return CommandCase(["preprocess", folder, "-o", out, "--series-uid", "1.2.3.4"], folder,
                       r"series 1\.2\.3\.4 not found; series here: .*\(CT, 20 files\).*\(CT, 12 files\)", (out,))


def case_missing_input(ws, sources, tmp, factory) -> CommandCase:
    missing, out = tmp / "scans" / "P404", tmp / "out"
    return CommandCase(["preprocess", missing, "-o", out], missing, r"no such file or folder", (out,))


def case_volume_too_small_for_denoiser(ws, sources, tmp, factory) -> CommandCase:
    img = nib.load(ws.pre / f"{CONTROL}.nii.gz")
    folder = tmp / "small"
    folder.mkdir()
    small = folder / "half.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::2, ::2], img.affine), str(small))  # 32x32 in-plane
    out = tmp / "out"
    return CommandCase(["residuals", folder, "-o", out, "--denoiser", ws.denoiser, "--device", "cpu"], small,
                       r"in-plane size 32x32, the denoiser expects 64x64", (out,))


def case_preprocessed_at_another_size(ws, sources, tmp, factory) -> CommandCase:
    pre60, out = _pre60(factory, sources), tmp / "out"
    return CommandCase(["residuals", pre60, "-o", out, "--denoiser", ws.denoiser, "--device", "cpu"],
                       pre60 / "preprocess.yaml", r"size_xy 60, but the denoiser .* expects 64", (out,))


def case_denoiser_data_not_multiple_of_8(ws, sources, tmp, factory) -> CommandCase:
    pre60, run = _pre60(factory, sources), tmp / "run"
    return CommandCase(["train-denoiser", pre60, "-o", run, "--studies", CONTROL, "--device", "cpu"],
                       pre60 / "preprocess.yaml", r"size_xy 60 is not a multiple of 8", (run,))


def case_denoiser_config_not_multiple_of_8(ws, sources, tmp, factory) -> CommandCase:
    cfg, run = tmp / "size60.yaml", tmp / "run"
    cfg.write_text("size_xy: 60\nfeatures: 4\n")
    return CommandCase(["train-denoiser", ws.pre, "-o", run, "--config", cfg, "--studies", CONTROL,
                        "--device", "cpu"], cfg, r"'size_xy' must be a multiple of 8", (run,))


def case_model_input_not_multiple_of_8(ws, sources, tmp, factory) -> CommandCase:
    model, out = tiny_predict_model(tmp / "model60", size=60), tmp / "out"
    return CommandCase(["predict", sources.dicom["cap"], "--model", model, "-o", out, "--device", "cpu"],
                       model / "config.yaml", r"denoiser input size 60 is not a multiple of 8", (out,))


def case_classifier_weights_of_another_arch(ws, sources, tmp, factory) -> CommandCase:
    from covidctnet.models.cnn3d import build_classifier

    other = build_classifier("covidctnet3d", input_size=(DEPTH, SIZE, SIZE), filters=(4, 8, 16, 32, 64))
    model, out = tiny_predict_model(tmp / "model", classifier_state=other.state_dict()), tmp / "out"
    return CommandCase(["predict", sources.dicom["cap"], "--model", model, "-o", out, "--device", "cpu"], model,
                       r"classifier weights do not fit arch 'covidctnet3d'.*shape mismatch", (out,))


def case_denoiser_weights_of_another_arch(ws, sources, tmp, factory) -> CommandCase:
    from covidctnet.models.bcdunet import BCDUNet

    model = tiny_predict_model(tmp / "model", denoiser_state=BCDUNet(features=8).state_dict())
    out = tmp / "out"
    return CommandCase(["predict", sources.dicom["cap"], "--model", model, "-o", out, "--device", "cpu"], model,
                       r"denoiser weights do not fit the architecture .*shape mismatch", (out,))


def case_not_a_model_directory(ws, sources, tmp, factory) -> CommandCase:
    out = tmp / "out"
    return CommandCase(["predict", sources.dicom["cap"], "--model", ws.pre, "-o", out], ws.pre,
                       r"config\.yaml missing; not a covidctnet model directory", (out,))


def _labels(tmp: Path, rows: list[list[str]]) -> Path:
    return write_csv(tmp / "labels.csv", ["study_id", "label"], rows)


def case_train_labels_unknown_class(ws, sources, tmp, factory) -> CommandCase:
    ids = ws.ids
    labels = _labels(tmp, [[ids["covid"], "covid"], [ids["cap"], "flu"], [ids["control"], "normal"]])
    run = tmp / "run"
    return CommandCase(["train-classifier", ws.residuals, "--labels", labels, "-o", run, "--config", ws.grid_config,
                        "--device", "cpu"], labels, r"row 3: unknown class 'flu'", (run,))


def case_train_labels_duplicated_id(ws, sources, tmp, factory) -> CommandCase:
    ids = ws.ids
    labels = _labels(tmp, [[ids["covid"], "covid"], [ids["cap"], "cap"], [ids["control"], "normal"],
                               [ids["covid"], "cap"]])
    run = tmp / "run"
    return CommandCase(["train-classifier", ws.residuals, "--labels", labels, "-o", run, "--config", ws.grid_config,
                        "--device", "cpu"], labels, rf"row 5: duplicated study_id '{ids['covid']}'", (run,))


def case_evaluate_labels_unknown_class(ws, sources, tmp, factory) -> CommandCase:
    ids = ws.ids
    labels = _labels(tmp, [[ids["covid"], "covid"], [ids["cap"], "tuberculosis"], [ids["control"], "normal"]])
    out = tmp / "out"
    return CommandCase(["evaluate", ws.report, "--labels", labels, "-o", out], labels,
                       r"row 3: unknown class 'tuberculosis'", (out,))


def case_evaluate_labels_duplicated_id(ws, sources, tmp, factory) -> CommandCase:
    ids = ws.ids
    labels = _labels(tmp, [[ids["covid"], "covid"], [ids["covid"], "covid"], [ids["cap"], "cap"],
                               [ids["control"], "normal"]])
    out = tmp / "out"
    return CommandCase(["evaluate", ws.report, "--labels", labels, "-o", out], labels,
                       rf"row 3: duplicated study_id '{ids['covid']}'", (out,))


def case_split_patient_in_two_sets(ws, sources, tmp, factory) -> CommandCase:
    ids = ws.ids
    labels = write_csv(tmp / "labels.csv", ["study_id", "label", "patient_id"],
                       [[ids["covid"], "covid", "PX"], [ids["cap"], "cap", "PX"], [ids["control"], "control", "PY"]])
    split = write_csv(tmp / "split.csv", ["study_id", "split"],
                      [[ids["covid"], "train"], [ids["cap"], "val"], [ids["control"], "train"]])
    run = tmp / "run"
    return CommandCase(["train-classifier", ws.residuals, "--labels", labels, "--split-file", split, "-o", run,
                        "--config", ws.grid_config, "--device", "cpu"], split,
                       r"patient 'PX' is in two sets: study cap-cap001 in val, study covid-P001 in train", (run,))


def case_residual_grid_too_small_for_cnn(ws, sources, tmp, factory) -> CommandCase:
    residuals = tmp / "res16"
    invoke_ok("residuals", ws.pre, "-o", residuals, "--denoiser", ws.denoiser, "--depth", 16, "--size", 16,
              "--device", "cpu")
    cfg, run = tmp / "grid16.yaml", tmp / "run"
    cfg.write_text("depth: 16\nsize_xy: 16\n")
    return CommandCase(["train-classifier", residuals, "--labels", ws.labels, "-o", run, "--config", cfg,
                        "--device", "cpu"], residuals, r"input_size \(16, 16, 16\) is too small", (run,))


def case_truncated_checkpoint(ws, sources, tmp, factory) -> CommandCase:
    run = _copy_run(denoiser_run(factory, ws), tmp)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return CommandCase(["train-denoiser", ws.pre, "-o", run, "--resume", "--epochs", 2, "--device", "cpu"], last,
                       r"cannot read checkpoint \(truncated or corrupt\?\)", unchanged=run)


def case_checkpoint_of_another_arch(ws, sources, tmp, factory) -> CommandCase:
    run = _copy_run(denoiser_run(factory, ws), tmp)
    cfg = tmp / "wider.yaml"
    settings = yaml.safe_load((run / "config.yaml").read_text())
    cfg.write_text(yaml.safe_dump({**settings, "features": 8}))  # the run was trained with features: 4
    return CommandCase(["train-denoiser", ws.pre, "-o", run, "--resume", "--config", cfg, "--epochs", 2,
                        "--device", "cpu"], run / "checkpoints" / "last.pt",
                       r"weights do not fit this model \(another architecture\?\)", unchanged=run)


COMMAND_CASES: dict[str, Callable[..., CommandCase]] = {
    "preprocess-unknown-series-uid": case_unknown_series_uid,
    "preprocess-missing-input": case_missing_input,
    "residuals-volume-too-small-for-denoiser": case_volume_too_small_for_denoiser,
    "residuals-preprocessed-at-another-size": case_preprocessed_at_another_size,
    "train-denoiser-data-size-not-multiple-of-8": case_denoiser_data_not_multiple_of_8,
    "train-denoiser-config-size-not-multiple-of-8": case_denoiser_config_not_multiple_of_8,
    "train-denoiser-truncated-checkpoint": case_truncated_checkpoint,
    "train-denoiser-checkpoint-of-another-arch": case_checkpoint_of_another_arch,
    "predict-model-size-not-multiple-of-8": case_model_input_not_multiple_of_8,
    "predict-classifier-weights-of-another-arch": case_classifier_weights_of_another_arch,
    "predict-denoiser-weights-of-another-arch": case_denoiser_weights_of_another_arch,
    "predict-not-a-model-directory": case_not_a_model_directory,
    "train-classifier-labels-unknown-class": case_train_labels_unknown_class,
    "train-classifier-labels-duplicated-id": case_train_labels_duplicated_id,
    "train-classifier-split-patient-in-two-sets": case_split_patient_in_two_sets,
    "train-classifier-grid-too-small-for-cnn": case_residual_grid_too_small_for_cnn,
    "evaluate-labels-unknown-class": case_evaluate_labels_unknown_class,
    "evaluate-labels-duplicated-id": case_evaluate_labels_duplicated_id,
}
"""Bad inputs of the commands after preprocess, by readable id (the test ids). Tampered model weights
(SHA256SUMS mismatch) are ``tests/inference/test_predict.py::test_tampered_weights_are_refused``."""


@pytest.mark.parametrize("kind", list(COMMAND_CASES))
def test_bad_command_input(kind, ws, sources, tmp_path, tmp_path_factory):
    case = COMMAND_CASES[kind](ws, sources, tmp_path, tmp_path_factory)
    before = snapshot(case.unchanged) if case.unchanged is not None else None
    result = invoke(*case.args)
    assert_one_line_error(result, case.culprit, case.problem)
    for path in case.absent:
        assert not path.exists(), f"{path} was left behind"
    if case.unchanged is not None:
        assert snapshot(case.unchanged) == before, "the failed command changed files in its run folder"


def test_residuals_batch_with_one_bad_volume(ws, tmp_path):
    """`covidctnet residuals` on a folder holding a good preprocessed volume and one the denoiser cannot take:
    exit 1, the good residual written, the bad one recorded and not written."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copyfile(ws.pre / f"{CONTROL}.nii.gz", folder / f"{CONTROL}.nii.gz")
    img = nib.load(ws.pre / f"{CONTROL}.nii.gz")
    bad = folder / "half.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::2, ::2], img.affine), str(bad))
    out = tmp_path / "out"
    result = invoke("residuals", folder, "-o", out, "--denoiser", ws.denoiser, "--device", "cpu")
    assert_one_line_error(result, bad, r"in-plane size 32x32", exit_code=1)
    rows = {r["study_id"]: r for r in read_manifest(out / "manifest.csv")}
    assert rows[CONTROL]["status"] == "ok" and rows["half"]["status"] == "error"
    assert (out / f"{CONTROL}_residual.nii.gz").is_file() and not (out / "half_residual.nii.gz").exists()
