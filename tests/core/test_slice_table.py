"""The ``<study_id>_slices.csv`` contract shared by slice-scores and validate-residuals."""

from __future__ import annotations

import math
import re

import pytest

from covidctnet.core.errors import InputError
from covidctnet.core.slice_table import REQUIRED_COLUMNS, SLICE_COLUMNS, read_slices_csv


def test_rows_are_parsed_and_empty_cells_are_nan(tmp_path):
    path = tmp_path / "s1_slices.csv"
    path.write_text(",".join(SLICE_COLUMNS) + ",lesion_score,residual_p95\ns1,0,-12.5,3.25,lesion,0.2,,0.4,0.2,0.01\n")
    [row] = read_slices_csv(path)
    assert row["study_id"] == "s1" and row["slice"] == 0 and row["z_mm"] == -12.5 and row["residual_p95"] == 0.01
    assert row["evidence"] == "lesion" and row["evidence_score"] == row["lesion_score"] == 0.2
    assert math.isnan(row["residual_score"])


def test_tables_written_before_the_evidence_columns_still_read(tmp_path):
    path = tmp_path / "s1_slices.csv"
    path.write_text(",".join(REQUIRED_COLUMNS) + "\ns1,0,-12.5,3.25,0.1,0.4\n")
    [row] = read_slices_csv(path)
    assert "evidence" not in row and row["hu_score"] == 0.4


@pytest.mark.parametrize("text,message", [
    ("study_id,slice,z_mm\ns1,0,1\n", "not a slice-scores CSV: column(s) ['lung_ml', 'residual_score', 'hu_score']"),
    (",".join(SLICE_COLUMNS) + "\ns1,zero,1,1,hu,1,1,1\n", "cannot read slice scores"),
    (None, "cannot read slice scores"),
])
def test_bad_file_is_one_input_error_naming_it(tmp_path, text, message):
    path = tmp_path / "bad_slices.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        read_slices_csv(path)
    assert str(path) in str(err.value)
