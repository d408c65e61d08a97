"""Opt-in DICOM output of ``predict`` for PACS (``predict --dicom-out DIR``; ``pip install covidctnet[dicom]``).

For each study read from a DICOM series, two new instances in the *source study* (same StudyInstanceUID, new series
and instance UIDs), built with highdicom:

- ``DIR/<study_id>/SR.dcm``: a Comprehensive 3D SR, TID 1500 measurement report. One measurement group (TID 1501)
  holds the three probabilities (numbers, unit "no units"), the call (``Predicted class``), and the algorithm (TID 4019: the
  model's name, and the sha256 of its ``SHA256SUMS`` as the version); a ``Qualitative Evaluations`` container holds
  the research-use statement. Its evidence lists every source instance (study, series and SOP instance UIDs) and the
  Segmentation below.
- ``DIR/<study_id>/SEG.dcm``: a binary Segmentation on the source series' own grid (one frame per source slice that
  holds a segmented voxel, each referencing its source instance): the lung voxels where the residual exceeds the
  threshold of the overlay PNG (the residual minus its median over the lungs, at or above the 95th percentile of its
  magnitude over the lungs), positive side only (denser than the denoiser's reconstruction, as ground glass and
  consolidation are). The residual is sampled from its grid onto the source voxels through the two affines
  (trilinear), the lung mask by nearest neighbour.

Both copy the patient and study modules from the source headers, as highdicom does: they go back to the PACS the
series came from. That is the one place covidctnet writes patient identifiers; nothing of the headers is logged or
written to CSV/JSON. NIfTI/NRRD inputs have no DICOM study to join and are skipped with a warning.

Two source defects occur in published series (COVID-CT-MD's series as published have both):

- No FrameOfReferenceUID (empty or absent): a Segmentation must have one (Type 1). It gets
  :func:`derived_frame_of_reference_uid` of the source series, the same for every output and every rerun, and one
  warning line says the result cannot be registered to the source by frame of reference (only through the source
  instances each frame references).
- Study, series, instance or frame-of-reference UIDs that are not DICOM UIDs (e.g. UUID strings with letters and dashes,
  or longer than 64 characters): the outputs reference them as they are, with one warning line naming the attributes
  (not their values). A PACS files the outputs by these values, so keeping them keeps the result with its images:
  Orthanc 1.10 stores such a source and its SR and SEG in one study and resolves their references; replacing them
  files the result in a study of its own (docs/dicom_output.md has the measurement). A PACS that checks the UID
  grammar may refuse the outputs, as it would the source series.

Codes: the probabilities and the control class have no standard concept, so they use the local coding scheme
``99COVIDCTNET`` (DICOM's "99" prefix for private schemes); COVID-19 and community-acquired pneumonia are SNOMED CT.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.config import disable_value_validation
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid
from scipy import ndimage

from covidctnet.core.errors import ConfigError
from covidctnet.core.files import atomic_path
from covidctnet.core.labels import CLASS_NAMES
from covidctnet.io.volume import Volume
from covidctnet.preprocessing.lungmask3d import mask_to_grid

__all__ = [
    "LOCAL_SCHEME",
    "RESEARCH_USE",
    "SEG_PERCENTILE",
    "LESION_THRESHOLD",
    "check_dicom_export",
    "derived_frame_of_reference_uid",
    "export_study",
    "residual_segment",
    "to_source_grid",
]

logger = logging.getLogger(__name__)

RESEARCH_USE = ("Research use only, not a medical device: covidctnet's result is not a diagnosis and must not be used "
                "for patient care.")
SEG_PERCENTILE = 95.0
"""Percentile of the residual's magnitude over the lungs above which a lung voxel is segmented (the overlay PNG's)."""
LESION_THRESHOLD = 0.5
"""Lesion probability at or above which a lung voxel is segmented when the evidence is a lesion map."""
LOCAL_SCHEME = "99COVIDCTNET"
SR_SERIES_NUMBER, SEG_SERIES_NUMBER = 9901, 9902
"""Series numbers of the created series: high, so a viewer lists them after the scanner's own series."""
SR_NAME, SEG_NAME = "SR.dcm", "SEG.dcm"
SKIPPED_NOT_DICOM = "skipped: not a DICOM input"
UID_ROOT = "1.2.826.0.1.3680043.10.511.3."
"""highdicom's UID root, which its ``UID()`` uses for every UID the outputs create."""
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
"""The source's UIDs that the outputs copy or reference."""


def check_dicom_export() -> None:
    """Raise one line when the optional ``dicom`` extra (highdicom) is missing.

    Raises:
        ConfigError: highdicom is not installed.
    """
    if importlib.util.find_spec("highdicom") is None:
        raise ConfigError("--dicom-out needs highdicom: pip install 'covidctnet[dicom]'")


def to_source_grid(values: np.ndarray, values_affine: np.ndarray, source_affine: np.ndarray,
                   source_shape: tuple[int, int, int], k: int, order: int = 1) -> np.ndarray:
    """Sample ``values`` at the voxel centres of slice ``k`` of a source grid, through both grids' affines.

    Args:
        values: (X, Y, Z) array on its own grid.
        values_affine: (4, 4) voxel → world (mm) of ``values``.
        source_affine: (4, 4) voxel → world (mm) of the source grid (same world frame, RAS here).
        source_shape: (I, J, K) of the source grid.
        k: the source slice.
        order: 1 trilinear, 0 nearest neighbour.

    Returns:
        (I, J) float array; NaN where the voxel centre lies outside ``values``' grid (beyond its edge voxels' centres
        by more than half a voxel).
    """
    i, j = np.meshgrid(np.arange(source_shape[0]), np.arange(source_shape[1]), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), np.full(i.size, k), np.ones(i.size)]).astype(np.float64)
    xyz = (np.linalg.inv(values_affine) @ source_affine @ ijk)[:3]
    sampled = ndimage.map_coordinates(np.asarray(values, dtype=np.float32), xyz, order=order, mode="nearest")
    # mode="nearest" extends the edge values half a voxel out to the grid's edge; further out there is no value
    outside = np.any((xyz < -0.5) | (xyz > np.array(values.shape)[:, None] - 0.5), axis=0)
    return np.where(outside, np.nan, sampled).reshape(source_shape[:2])


def residual_segment(volume: Volume, residual: np.ndarray, residual_affine: np.ndarray, lungs: np.ndarray,
                     lungs_affine: np.ndarray, evidence: str = "residual") -> np.ndarray:
    """The lung voxels of the source grid whose evidence is high: for a residual, the rule of the module docstring;
    for a lesion map (``evidence="lesion"``), a lesion probability of at least 0.5.

    Args:
        volume: the source CT (its grid and affine are the output's).
        residual: (X, Y, Z) signed residual on the classifier's grid, ``residual_affine`` its voxel → RAS affine.
        lungs: (X', Y', Z') lung mask (non-zero inside), ``lungs_affine`` its voxel → RAS affine; it covers the same
            field of view as ``residual`` (the RAS-reoriented source).
        evidence: ``residual`` or ``lesion`` (``residual`` then holds lesion probabilities).

    Returns:
        (I, J, K) bool on the source grid.
    """
    inside = mask_to_grid(lungs > 0, residual.shape)
    if not inside.any():
        return np.zeros(volume.shape, dtype=bool)
    if evidence == "lesion":
        offset, threshold = 0.0, LESION_THRESHOLD
    else:
        offset = float(np.median(residual[inside]))
        threshold = float(np.percentile(np.abs(residual[inside] - offset), SEG_PERCENTILE))
    out = np.zeros(volume.shape, dtype=bool)
    lung_float = (lungs > 0).astype(np.float32)
    for k in range(volume.shape[2]):
        res_k = to_source_grid(residual, residual_affine, volume.affine, volume.shape, k)
        lung_k = to_source_grid(lung_float, lungs_affine, volume.affine, volume.shape, k, order=0)
        with np.errstate(invalid="ignore"):  # NaN (outside either grid) compares False
            out[:, :, k] = (lung_k > 0.5) & (res_k - offset >= threshold)
    return out


_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Type 2 attributes of the patient and general study modules, which highdicom copies from the source."""


def _completed_headers(headers: list[Any], frame_of_reference: str | None) -> list[Any]:
    """Copies of the headers with the Type 2 patient/study attributes present (empty where absent), and with
    ``frame_of_reference`` as FrameOfReferenceUID where it is not None.

    Type 2 means present but possibly empty; de-identified series (the public data sets) often drop them, and highdicom
    then fails. Absent stays empty, nothing is made up. Complete headers (a PACS export) are used as they are; a
    multi-frame file's one header stays one object.
    """
    copies: dict[int, Any] = {}
    for ds in headers:
        missing = [k for k in _TYPE2_PATIENT_STUDY if k not in ds]
        if (missing or frame_of_reference is not None) and id(ds) not in copies:
            copied = copy.deepcopy(ds)  # Dataset.copy() is shallow: it would add them to the Volume's headers too
            for keyword in missing:
                setattr(copied, keyword, "")
            if frame_of_reference is not None:
                copied.FrameOfReferenceUID = frame_of_reference
            copies[id(ds)] = copied
    return [copies.get(id(ds), ds) for ds in headers]


def derived_frame_of_reference_uid(series_uid: str) -> str:
    """The FrameOfReferenceUID given to the outputs of a source series that has none.

    Derived from the source's SeriesInstanceUID (a hash, under highdicom's UID root), so every output of the series
    and every rerun gets the same one, and no two series share one.

    Args:
        series_uid: the source's SeriesInstanceUID, as it is (valid or not).

    Returns:
        A valid DICOM UID (at most 64 characters).
    """
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=["covidctnet frame of reference", series_uid]))


def _invalid_uids(headers: list[Any]) -> list[str]:
    """The keywords of :data:`SOURCE_UIDS` whose value, in any header, is not a DICOM UID (empty FoR left aside)."""
    bad = []
    for keyword in SOURCE_UIDS:
        values = {str(ds.get(keyword, "") or "") for ds in headers}
        if keyword == "FrameOfReferenceUID":
            values.discard("")  # a missing frame of reference gets a derived one
        if any(not UID(v).is_valid for v in values):
            bad.append(keyword)
    return bad


def _code(value: str, meaning: str, scheme: str = LOCAL_SCHEME) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _class_codes() -> dict[str, tuple[Any, Any]]:
    """Per class: the concept of its probability and the finding it names."""
    return {
        "control": (_code("p-control", "Probability of control (neither COVID-19 nor CAP)"),
                    _code("control", "Control (neither COVID-19 nor CAP)")),
        "covid": (_code("p-covid", "Probability of COVID-19"),
                  _code("840539006", "COVID-19", "SCT")),
        "cap": (_code("p-cap", "Probability of community-acquired pneumonia"),
                _code("385093006", "Community acquired pneumonia", "SCT")),
    }


def _segmentation(sources: list[Any], frames: list[int | None], mask: np.ndarray, model: str, evidence: str,
                  weights_sha256: str) -> Any:
    import highdicom as hd

    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if frames[0] is None:  # single-frame series: one source instance per slice, in array order
        source_images = sources
        pixels = np.ascontiguousarray(mask.transpose(2, 1, 0))  # (I, J, K) = (column, row, slice) → (K, rows, cols)
    else:  # one multi-frame file: its frames in the file's order
        source_images = [sources[0]]
        pixels = np.zeros((int(sources[0].NumberOfFrames), rows, cols), dtype=bool)
        for k, frame in enumerate(frames):
            pixels[frame] = mask[:, :, k].T
    algorithm = hd.AlgorithmIdentificationSequence(name=model[:64], family=codes.cid7162.ArtificialIntelligence,
                                                   version=weights_sha256)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=("lesion probability >= 0.5 in lungs" if evidence == "lesion" else
                       "high denoising residual in lungs"),
        segmented_property_category=_code("49755003", "Morphologically Altered Structure", "SCT"),
        segmented_property_type=(_code("lesion-probability", "Lesion probability at least 0.5") if evidence == "lesion"
                                 else _code("high-residual", "High denoising residual")),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_code("39607008", "Lung", "SCT")],
    )
    return hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="covidctnet",
        manufacturer_model_name=model[:64],
        software_versions=importlib.metadata.version("covidctnet"),
        device_serial_number=weights_sha256[:16],
        series_description=f"covidctnet {evidence} (research use, not a medical device)",
        content_description="High residual in the lungs",
        content_label="RESIDUAL",
        omit_empty_frames=bool(mask.any()),  # an all-empty mask keeps its frames: a SEG needs at least one
    )


def _report(sources: list[Any], seg: Any, probabilities: Mapping[str, float], predicted: str, model: str,
            weights_sha256: str) -> Any:
    import highdicom as hd

    codes_by_class = _class_codes()
    algorithm = hd.sr.AlgorithmIdentification(name=model, version=weights_sha256)
    no_units = _code("1", "no units", "UCUM")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="covidctnet study result"),
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes_by_class[c][0], value=float(probabilities[c]), unit=no_units)
                      for c in CLASS_NAMES],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_code("predicted", "Predicted class"),
                                                             value=codes_by_class[predicted][1])],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="covidctnet", manufacturer_name="covidctnet", model_name=model[:64]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("24627-2", "CT Chest", "LN"),
        imaging_measurements=[group],
    )
    # TID 1500 row 12: free-text evaluations of the whole report; highdicom has no argument for it
    evaluations = hd.sr.ContainerContentItem(name=_code("C0034375", "Qualitative Evaluations", "UMLS"),
                                             relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=RESEARCH_USE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    report[0].ContentSequence.append(evaluations)
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="covidctnet",
        is_complete=True,
        series_description="covidctnet result (research use, not a medical device)",
    )


def export_study(out_dir: str | Path, study_id: str, volume: Volume, probabilities: Mapping[str, float],
                 predicted: str, model: str, weights_sha256: str, residual: np.ndarray, residual_affine: np.ndarray,
                 lungs: np.ndarray, lungs_affine: np.ndarray, evidence: str = "residual") -> str:
    """Write ``out_dir/<study_id>/SEG.dcm`` and ``SR.dcm`` for a study read from DICOM (see the module docstring).

    Args:
        probabilities: class name → probability, as reported (the SR holds exactly these numbers).
        predicted: the call, a class name.
        model, weights_sha256: the model's name and the hash of its ``SHA256SUMS``.
        residual, residual_affine, lungs, lungs_affine, evidence: see :func:`residual_segment`; the SEG's segment
            names the evidence.

    Returns:
        For the report row: the written files relative to ``out_dir``, space-separated, or
        :data:`SKIPPED_NOT_DICOM` for a volume not read from DICOM (with one warning).

    A source without a FrameOfReferenceUID, or with UIDs that are not DICOM UIDs, gets one warning line each (see the
    module docstring); the lines name the study and the attributes, never a value.
    """
    if not volume.dicom_slices:
        logger.warning("%s: --dicom-out skipped: not a DICOM input (no study to add the result to)", study_id)
        return SKIPPED_NOT_DICOM
    headers = [header for header, _ in volume.dicom_slices]
    frames = [frame for _, frame in volume.dicom_slices]
    mask = residual_segment(volume, residual, residual_affine, lungs, lungs_affine, evidence)
    hd_logger = logging.getLogger("highdicom")
    level = hd_logger.level
    hd_logger.setLevel(logging.WARNING)  # its INFO lines name the source instances by UID: kept out of the logs
    try:
        # pydicom's warning on a value that breaks its VR quotes the value: a source UID would reach the logs
        with disable_value_validation():
            frame_of_reference = None
            if not str(headers[0].get("FrameOfReferenceUID", "") or "").strip():
                frame_of_reference = derived_frame_of_reference_uid(str(headers[0].SeriesInstanceUID))
                logger.warning("%s: the source series has no FrameOfReferenceUID: the SEG gets a new one, so it cannot "
                               "be registered to the source by frame of reference (only through the source slices "
                               "its frames reference)", study_id)
            invalid = _invalid_uids(headers)
            if invalid:
                logger.warning("%s: the source's %s not DICOM UIDs (digits and dots, at most 64 characters): the SR "
                               "and SEG reference them as they are, to stay filed with their images; a PACS that "
                               "checks UIDs may refuse them", study_id,
                               f"{', '.join(invalid)} {'is' if len(invalid) == 1 else 'are'}")
            sources = _completed_headers(headers, frame_of_reference)
            instances = list({str(ds.SOPInstanceUID): ds for ds in sources}.values())  # a multi-frame file once
            seg = _segmentation(sources, frames, mask, model, evidence, weights_sha256)
            sr = _report(instances, seg, probabilities, predicted, model, weights_sha256)
            folder = Path(out_dir) / study_id
            for name, ds in ((SEG_NAME, seg), (SR_NAME, sr)):
                with atomic_path(folder / name) as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
    finally:
        hd_logger.setLevel(level)
    return " ".join(f"{study_id}/{name}" for name in (SEG_NAME, SR_NAME))
