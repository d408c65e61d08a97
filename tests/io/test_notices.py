"""covidctnet.io.notices: third-party notices raised while a scan is read become one line with counts per kind."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.misc import warn_and_log

from covidctnet.io.notices import collect_notices, notice_kind

LOG = logging.getLogger("covidctnet.test_notices")


def test_notices_become_one_line_with_counts_per_kind(caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")  # pydicom sets its own logger to WARNING
    with collect_notices(LOG, "scan-1") as notices:
        for value in ("1.2.abc", "09bc8aea-ff9c", "x" * 70):
            warn_and_log(f"Invalid value for VR UI: '{value}'. Please see <https://dicom.nema.org> for allowed values.")
        warnings.warn("something else 3 times", RuntimeWarning)
        logging.getLogger("pydicom").info("pydicom chatter below WARNING passes through")
    assert len(notices.items) == 4  # pydicom's log record and Python warning of one notice count once
    summary = [r.getMessage() for r in caplog.records if r.name == LOG.name and r.levelno == logging.WARNING]
    assert summary == ["scan-1: 4 notices from the DICOM/image libraries while reading, by kind: "
                       "3 × pydicom: Invalid value for VR UI: '…'.; 1 × Python: RuntimeWarning: something else N times "
                       "(-v lists each)"]
    each = [r.getMessage() for r in caplog.records if r.name == LOG.name and r.levelno == logging.DEBUG]
    assert len(each) == 4 and each[0] == "scan-1: pydicom: Invalid value for VR UI: '…'."
    assert not [r for r in caplog.records if r.name == "pydicom" and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in caplog.records if r.name == "pydicom"] == [
        "pydicom chatter below WARNING passes through"]
    for value in ("1.2.abc", "09bc8aea", "xxxx"):  # values masked everywhere: they may be identifiers
        assert value not in caplog.text
    assert "Invalid value" not in capfd.readouterr().err


def test_itk_messages_are_collected_and_everything_is_restored_afterwards(caplog, tmp_path, capfd):
    """A real ITK warning (ImageSeriesReader on slices with a missing one) is counted, not printed; after the block
    ITK, pydicom and Python warnings behave as before."""
    files = []
    for k, z in enumerate((0.0, 1.0, 2.0, 5.0)):
        img = sitk.GetImageFromArray(np.full((1, 4, 4), k, np.int16))
        img.SetOrigin((0.0, 0.0, z))
        files.append(str(tmp_path / f"s{k}.nrrd"))
        sitk.WriteImage(img, files[-1])

    def read_series() -> None:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.Execute()

    filters_before = list(warnings.filters)
    caplog.set_level(logging.DEBUG)
    with collect_notices(LOG, "scan-2") as notices:
        read_series()
    assert notices.counts() == {"ITK/GDCM: ImageSeriesReader: Non uniform sampling or missing slices detected, "
                                "maximum nonuniformity:N": 1}
    assert "Non uniform" not in capfd.readouterr().err
    assert warnings.filters == filters_before
    assert not logging.getLogger("pydicom").filters
    read_series()  # ITK prints its warning itself again
    assert "Non uniform sampling" in capfd.readouterr().err
    with pytest.warns(UserWarning, match="after the block"):
        warn_and_log("after the block")


def test_a_refusal_keeps_only_the_error_line(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError), collect_notices(LOG, "scan-3"):
        warn_and_log("Invalid value for VR UI: 'abc'")
        raise ValueError("refused")
    assert not [r for r in caplog.records if r.name == LOG.name and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in caplog.records if r.name == LOG.name] == [
        "scan-3: pydicom: Invalid value for VR UI: '…'"]


def test_notice_kind_masks_values_and_numbers():
    assert notice_kind("The value length (70) exceeds the maximum length of 64 allowed for VR UI. Invalid value for "
                       "VR UI: 'xxx'. Please see <https://x> for allowed values for each VR.") == (
        "The value length (N) exceeds the maximum length of N allowed for VR UI. Invalid value for VR UI: '…'.")
    assert notice_kind("WARNING: In /a/itkGDCMImageIO.cxx, line 361\nGDCMImageIO (0x55d2): Converting from "
                       "MONOCHROME1\n\n") == "GDCMImageIO: Converting from MONOCHROME1"
