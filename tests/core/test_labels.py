"""Tests of covidctnet.core.labels: the aliases of each class, the 2-class names, and the labels CSV reader."""

from __future__ import annotations

import pytest

from covidctnet.core.errors import LabelError
from covidctnet.core.labels import (
    CLASS_NAMES,
    label_index,
    normalize_any_label,
    normalize_binary_label,
    normalize_label,
    read_labels_csv,
)


@pytest.mark.parametrize("raw, name", [
    ("normal", "control"), (" Healthy ", "control"), ("CT-0", "control"), (0, "control"),
    ("COVID-19", "covid"), ("covid_19", "covid"), ("CT-3", "covid"), ("NCP", "covid"), (1, "covid"),
    ("Pneumonia", "cap"), ("community-acquired pneumonia", "cap"), ("2", "cap"),
])
def test_aliases(raw, name):
    assert normalize_label(raw) == name
    assert label_index(raw) == CLASS_NAMES.index(name)


def test_two_class_names():
    assert normalize_any_label("Non_COVID") == "noncovid" and normalize_any_label("cap") == "cap"
    assert [normalize_binary_label(v) for v in ("cap", "normal", "CT_COVID", "ct-noncovid")] == [
        "noncovid", "noncovid", "covid", "noncovid"]
    with pytest.raises(LabelError, match="unknown class"):
        normalize_label("noncovid")  # not a 3-class name


def test_unknown_label_names_the_source():
    with pytest.raises(LabelError, match=r"labels.csv: row 3: unknown class 'flu'"):
        normalize_any_label("flu", "labels.csv: row 3")


def test_read_labels_csv(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("\ufeffcase_id,label\na,COVID-19\nb,normal\n", encoding="utf-8")
    assert read_labels_csv(path) == {"a": "covid", "b": "control"}  # case_id for study_id; BOM ignored
    path.write_text("study_id,label\na,covid\na,cap\n")
    with pytest.raises(LabelError, match=r"row 3: duplicated study_id 'a'"):
        read_labels_csv(path)
    path.write_text("study_id,label\na,noncovid\n")
    assert read_labels_csv(path, normalize=normalize_any_label) == {"a": "noncovid"}
    with pytest.raises(LabelError, match="row 2: unknown class"):
        read_labels_csv(path)
    path.write_text("id,diagnosis\n")
    with pytest.raises(LabelError, match="empty"):
        read_labels_csv(path)
    path.write_text("id,diagnosis\nx,covid\n")
    with pytest.raises(LabelError, match=r"missing column\(s\) \['study_id', 'label'\]"):
        read_labels_csv(path)
    with pytest.raises(LabelError, match="cannot read"):
        read_labels_csv(tmp_path / "missing.csv")
