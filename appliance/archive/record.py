"""What the index keeps of an instance, read from its DICOM header.

The attributes are the ones a field engineer searches by when a doctor calls
("the chest X-ray of patient 12345 from Tuesday"). Names are decoded with the
dataset's Specific Character Set (ISO 2022 IR 87 / IR 13, ISO_IR 192 ...) by
pydicom, so 山田^太郎 is stored and searched as text, not as escape bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset

from appliance.dicom.structure import DEFAULT_LIMITS, IncompleteDataset, Limits, Walk, check_part10

log = logging.getLogger("appliance.archive")


class UnreadableObject(ValueError):
    """The object cannot be archived: not DICOM, truncated, or missing identity."""


@dataclass(frozen=True)
class InstanceRecord:
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    series_instance_uid: str
    modality: str
    series_number: str
    station_name: str
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: str
    transfer_syntax_uid: str


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")  # trailing NULs are padding; inner ones are kept


IMAGE_MARKERS = ("Rows", "Columns")


def read_record(fp: BinaryIO, size: int, source: str,
                limits: Limits = DEFAULT_LIMITS) -> tuple[InstanceRecord, Walk]:
    """Check the Part 10 file in `fp` is complete and read its index record.

    `source` names the object in error messages (a file, a sender).
    Raises UnreadableObject with a reason a field engineer can act on.
    """
    try:
        walk = check_part10(fp, size, limits)  # before pydicom: it would inflate or recurse unbounded
    except IncompleteDataset as exc:
        raise UnreadableObject(f"{source}: {exc}") from None
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # pydicom decodes each text value with the dataset's Specific
            # Character Set as it is read; Dataset.decode() on top cost ~0.7 ms.
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for bad input
        raise UnreadableObject(f"{source}: DICOM header cannot be parsed: {exc}") from None
    if all(k in ds for k in IMAGE_MARKERS) and not walk.has_pixel_data:
        raise UnreadableObject(f"{source}: image has Rows/Columns but no pixel data (truncated?)")
    _check_native_pixel_length(ds, walk, source)
    try:
        record = InstanceRecord(
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate"),
            sex=_text(ds, "PatientSex"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            accession_number=_text(ds, "AccessionNumber"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            study_description=_text(ds, "StudyDescription"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality"),
            series_number=_text(ds, "SeriesNumber"),
            station_name=_text(ds, "StationName"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            instance_number=_text(ds, "InstanceNumber"),
            transfer_syntax_uid=str(walk.transfer_syntax),
        )
    except Exception as exc:
        raise UnreadableObject(f"{source}: DICOM header has invalid values: {exc}") from None
    return _with_identity(record, ds, source), walk


def _check_native_pixel_length(ds: Dataset, walk: Walk, source: str) -> None:
    """Uncompressed pixel data must hold every frame the header announces.

    A lenient sender can re-encode a truncated file consistently: the element
    is then complete but too short for Rows x Columns x frames, and the image
    is as lost as a cut file.
    """
    length = walk.native_pixel_data_length
    if length is None:
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return  # not an image header we can reason about: keep the object
    pixels = rows * columns * samples * frames
    needed = (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)
    if ds.get("PhotometricInterpretation", "") == "YBR_FULL_422":
        needed = needed * 2 // 3
    if length < needed:
        raise UnreadableObject(
            f"{source}: pixel data holds {length} bytes but {rows}x{columns}x{samples} samples "
            f"x {frames} frame(s) at {bits} bits need {needed} (image truncated)"
        )


MISSING_PREFIX = "missing:"


def _with_identity(record: InstanceRecord, ds: Dataset, source: str) -> InstanceRecord:
    """Fill identity gaps instead of failing the sender.

    Only an object whose SOP Instance UID is unknown (in the dataset and in its
    file meta) is refused: it cannot be told apart from any other. A missing
    SOP Class UID is taken from the file meta; a missing Study or Series
    Instance UID becomes a placeholder key "missing:<SOP Instance UID>" so the
    object is archived and findable, and a warning is logged.
    """
    meta = getattr(ds, "file_meta", None)
    changes: dict[str, str] = {}
    if not record.sop_instance_uid and meta is not None:
        changes["sop_instance_uid"] = _text(meta, "MediaStorageSOPInstanceUID")
    if not record.sop_class_uid and meta is not None:
        changes["sop_class_uid"] = _text(meta, "MediaStorageSOPClassUID")
    sop_uid = changes.get("sop_instance_uid", record.sop_instance_uid)
    if not sop_uid:
        raise UnreadableObject(f"{source}: no SOP Instance UID in the dataset or its file meta")
    for name in ("study_instance_uid", "series_instance_uid"):
        if not getattr(record, name):
            changes[name] = MISSING_PREFIX + sop_uid
            log.warning("%s: %s is missing; indexed under %s", source, name, changes[name])
    return dataclasses.replace(record, **changes) if changes else record


def read_record_from_path(path: Path, source: str | None = None) -> tuple[InstanceRecord, Walk]:
    with open(path, "rb") as fp:
        return read_record(fp, path.stat().st_size, source or str(path))
