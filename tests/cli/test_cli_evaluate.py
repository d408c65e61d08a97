"""CLI tests of ``covidctnet evaluate`` and ``covidctnet reader-study``: outputs, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from covidctnet.cli import cli

REPO = Path(__file__).resolve().parents[2]
HEADER = "study_id,p_control,p_covid,p_cap,predicted,status,error,model,weights_sha256\n"
GOOD_PRED = (
    HEADER
    + "a,0.7,0.2,0.1,control,ok,,m,\nb,0.1,0.8,0.1,covid,ok,,m,\nc,0.2,0.3,0.5,cap,ok,,m,\nd,0.3,0.6,0.1,covid,ok,,m,\n"
)
GOOD_LABELS = "study_id,label\na,control\nb,covid\nc,cap\nd,covid\n"


def run(args: list[str]):
    return CliRunner().invoke(cli, args)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output


@pytest.fixture()
def fast_config(tmp_path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text("n_bootstrap: 100\nroc_band: false\n")
    return path


def test_evaluate_command(tmp_path, fast_config):
    (tmp_path / "report.csv").write_text(GOOD_PRED + "e,,,,,error,NotCTError: MR,m,\n")
    (tmp_path / "labels.csv").write_text(GOOD_LABELS + "e,cap\n")
    out = tmp_path / "out"
    result = run(
        ["evaluate", str(tmp_path / "report.csv"), "--labels", str(tmp_path / "labels.csv"), "-o", str(out),
         "--threshold", "0.5", "--config", str(fast_config)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 cases evaluated, 1 excluded" in result.stdout
    assert "COVID-19 vs rest: accuracy 100.0%" in result.stdout  # b, d >= 0.5; a, c below
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["threshold"] == 0.5 and metrics["config"]["n_bootstrap"] == 100
    assert (out / "report.md").exists() and (out / "roc_2class.png").exists()


# (file to corrupt, its content, fragments of the expected message)
EVALUATE_BAD_INPUTS = [
    ("pred", "", ["report.csv", "empty file"]),
    ("pred", HEADER, ["report.csv", "header but no rows"]),
    ("pred", "id,score\na,0.3\n", ["report.csv", "missing column"]),
    ("pred", GOOD_PRED + "zz,0.2,0.3,0.5,cap,ok,,m,\n", ["report.csv", "not in", "labels.csv", "'zz'"]),
    ("pred", GOOD_PRED + "a,0.2,0.3,0.5,cap,ok,,m,\n", ["report.csv", "duplicated study_id 'a'"]),
    ("pred", GOOD_PRED.replace("d,0.3,0.6,0.1,covid,ok,,m,\n", ""), ["labels.csv", "missing from", "'d'"]),
    ("pred", GOOD_PRED.replace("0.1,0.8,0.1", "0.1,1.8,0.1"), ["report.csv", "row 3", "outside [0, 1]"]),
    ("pred", GOOD_PRED.replace("0.1,0.8,0.1", "-0.2,0.8,0.1"), ["report.csv", "outside [0, 1]"]),
    ("pred", GOOD_PRED.replace("0.1,0.8,0.1", "0.1,0.7,0.1"), ["report.csv", "= 0.9, expected 1"]),
    ("pred", GOOD_PRED.replace("covid,ok", "influenza,ok", 1), ["report.csv", "unknown class 'influenza'"]),
    ("pred", GOOD_PRED.replace(",ok,", ",done,", 1), ["report.csv", "unknown status 'done'"]),
    ("labels", "", ["labels.csv", "empty file"]),
    ("labels", GOOD_LABELS + "a,cap\n", ["labels.csv", "duplicated study_id 'a'"]),
    ("labels", GOOD_LABELS.replace("c,cap", "c,flu"), ["labels.csv", "unknown class 'flu'"]),
    ("labels", GOOD_LABELS + "x,covid\n", ["labels.csv", "missing from", "'x'"]),
]


@pytest.mark.parametrize("target, content, fragments", EVALUATE_BAD_INPUTS, ids=[f"{i}" for i in range(15)])
def test_evaluate_bad_input_one_line_error_and_no_report(tmp_path, target, content, fragments):
    pred, labels = tmp_path / "report.csv", tmp_path / "labels.csv"
    pred.write_text(content if target == "pred" else GOOD_PRED)
    labels.write_text(content if target == "labels" else GOOD_LABELS)
    result = run(["evaluate", str(pred), "--labels", str(labels), "-o", str(tmp_path / "out")])
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_evaluate_missing_file_and_bad_options(tmp_path, fast_config):
    (tmp_path / "labels.csv").write_text(GOOD_LABELS)
    result = run(
        ["evaluate", str(tmp_path / "nope.csv"), "--labels", str(tmp_path / "labels.csv"), "-o", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "nope.csv", "not found")
    (tmp_path / "report.csv").write_text(GOOD_PRED)
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_boostrap: 10\n")
    args = ["evaluate", str(tmp_path / "report.csv"), "--labels", str(tmp_path / "labels.csv"),
            "-o", str(tmp_path / "o")]  # fmt: skip
    result = run([*args, "--config", str(bad)])
    assert_one_line_error(result, "bad.yaml", "unknown key(s) ['n_boostrap']")
    result = run([*args, "--threshold", "1.5"])
    assert_one_line_error(result, "--threshold", "must be in [0, 1]")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------------
# reader-study

TRUTH = "case_id,label\na,control\nb,covid\nc,cap\nd,covid\n"
R1 = "case_id,label,score\na,control,1\nb,covid,5\nc,covid,4\nd,cap,2\n"
R2 = "case_id,label\na,control\nb,covid\nc,cap\nd,covid\n"
R3 = "case_id,label\na,cap\nb,covid\nc,cap\nd,control\n"


def write_study(tmp: Path, **override: str) -> dict[str, Path]:
    files = {"model": GOOD_PRED, "truth": TRUTH, "r1": R1, "r2": R2, "r3": R3}
    files.update(override)
    paths = {}
    for key, text in files.items():
        paths[key] = tmp / f"{key}.csv"
        paths[key].write_text(text)
    return paths


def study_args(p: dict[str, Path], out: Path) -> list[str]:
    return ["reader-study", "--model", str(p["model"]), "--readers", str(p["r1"]), str(p["r2"]), str(p["r3"]),
            "--truth", str(p["truth"]), "-o", str(out)]  # fmt: skip


def test_reader_study_command(tmp_path):
    p = write_study(tmp_path)
    fast_config = tmp_path / "fast_rs.yaml"
    fast_config.write_text("n_bootstrap: 100\n")
    result = run([*study_args(p, tmp_path / "out"), "--config", str(fast_config)])
    assert result.exit_code == 0, result.output
    assert "Model" in result.stdout and "Majority vote" in result.stdout
    table = (tmp_path / "out" / "table.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == ["r1", "r2", "r3", "Reader average", "Majority vote", "Model"]
    # the same files given as repeated --readers options give the same study
    repeated = ["reader-study", "--model", str(p["model"]), "--readers", str(p["r1"]), "--readers", str(p["r2"]),
                "--readers", str(p["r3"]), "--truth", str(p["truth"]), "-o", str(tmp_path / "out2"),
                "--config", str(fast_config)]  # fmt: skip
    assert run(repeated).exit_code == 0
    assert (tmp_path / "out2" / "table.csv").read_text() == (tmp_path / "out" / "table.csv").read_text()


READER_BAD_INPUTS = [
    (
        {"r2": "case_id,label\na,control\nb,covid\nc,cap\n"},
        ["truth.csv", "missing from the reader CSV", "r2.csv", "'d'"],
    ),
    ({"r2": R2 + "e,cap\n"}, ["r2.csv", "not in", "truth.csv", "'e'"]),
    ({"r3": R3 + "a,cap\n"}, ["r3.csv", "duplicated case_id 'a'"]),
    ({"r1": R1.replace("c,covid,4", "c,tuberculosis,4")}, ["r1.csv", "unknown class 'tuberculosis'"]),
    ({"r1": R1.replace("c,covid,4", "c,covid,high")}, ["r1.csv", "score 'high' is not a number"]),
    ({"r3": ""}, ["r3.csv", "empty file"]),
    ({"model": GOOD_PRED.replace("d,0.3,0.6,0.1,covid,ok,,m,\n", "")}, ["truth.csv", "missing from the model", "'d'"]),
    ({"model": GOOD_PRED + "q,0.2,0.3,0.5,cap,ok,,m,\n"}, ["model.csv", "not in", "'q'"]),
    ({"model": GOOD_PRED.replace("0.2,0.3,0.5", "0.2,0.3,0.4")}, ["model.csv", "expected 1"]),
    ({"model": GOOD_PRED.replace("0.2,0.3,0.5", "0.2,1.3,0.5")}, ["model.csv", "outside [0, 1]"]),
    ({"model": GOOD_PRED.replace("0.2,0.3,0.5,cap,ok,", ",,,,error,")}, ["model.csv", "needs every case"]),
    ({"truth": TRUTH + "b,cap\n"}, ["truth.csv", "duplicated case_id 'b'"]),
    ({"truth": TRUTH.replace("a,control", "a,flu")}, ["truth.csv", "unknown class 'flu'"]),
]


@pytest.mark.parametrize("override, fragments", READER_BAD_INPUTS, ids=[f"{i}" for i in range(13)])
def test_reader_study_bad_input_one_line_error_and_no_output(tmp_path, override, fragments):
    p = write_study(tmp_path, **override)
    result = run(study_args(p, tmp_path / "out"))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_reader_study_needs_a_reader(tmp_path):
    p = write_study(tmp_path)
    result = run(["reader-study", "--model", str(p["model"]), "--truth", str(p["truth"]), "-o", str(tmp_path / "o")])
    assert_one_line_error(result, "no reader CSV")


def test_cli_modules_import_only_click():
    code = (
        "import sys, covidctnet.cli.evaluate, covidctnet.cli.reader_study; "
        "heavy = [m for m in ('numpy', 'scipy', 'matplotlib', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
