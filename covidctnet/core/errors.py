"""Typed exceptions. Library code raises these; only the CLI turns them into one line on stderr and an exit code."""

from __future__ import annotations

__all__ = [
    "CovidCTNetError",
    "InputError",
    "UnreadableFileError",
    "NotCTError",
    "NotHUError",
    "SliceGapError",
    "TooFewSlicesError",
    "NonFiniteError",
    "SeriesSelectionError",
    "ShapeError",
    "LabelError",
    "SplitError",
    "NoLungsError",
    "ConfigError",
    "ModelDirError",
    "CheckpointError",
]


class CovidCTNetError(Exception):
    """Base class of every error covidctnet raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(CovidCTNetError):
    """The input (a scan, an image, a CSV) is not usable; the message names the file and the problem."""

    exit_code = 2


class UnreadableFileError(InputError):
    """A file is missing, empty, truncated or not in a format we read."""


class NotCTError(InputError):
    """The series is not a CT (e.g. Modality MR)."""


class NotHUError(InputError):
    """Intensities cannot be Hounsfield units (e.g. an 8-bit image or an already normalised volume)."""


class SliceGapError(InputError):
    """Slices are missing, duplicated or unevenly spaced."""


class TooFewSlicesError(InputError):
    """The volume has fewer slices than the pipeline needs."""


class NonFiniteError(InputError):
    """The volume holds NaN or infinite voxels."""


class SeriesSelectionError(InputError):
    """A folder holds no usable series, or the requested series is not there."""


class ShapeError(InputError):
    """An array has a shape the model cannot take (wrong rank, too small, not divisible by the network stride)."""


class LabelError(InputError):
    """A labels CSV has an unknown class, a duplicated id or a missing column."""


class SplitError(InputError):
    """A data split is inconsistent (a patient in two sets, a listed file missing)."""


class NoLungsError(InputError):
    """The scan holds too little lung to be a chest CT (the chest-coverage check of the 3D lung mask)."""


class ConfigError(CovidCTNetError):
    """A config YAML or command-line override has an unknown key, a wrong type or an out-of-range value."""

    exit_code = 2


class ModelDirError(CovidCTNetError):
    """A model directory is incomplete, its weights do not match their hash, or its architecture is unknown."""

    exit_code = 2


class CheckpointError(CovidCTNetError):
    """A checkpoint cannot be read safely (truncated, wrong architecture, or a pickle that would run code)."""

    exit_code = 2
