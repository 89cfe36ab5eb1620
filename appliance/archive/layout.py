"""Where an instance lives in the archive tree.

The layout is the one clinics know from their gateway PCs, so a field engineer
can browse it over a share and find a patient by eye:

    <data_dir>/archive/<YYYYMMDD>/<MODALITY>-<PatientID>/<SOPInstanceUID>.dcm

Every component comes from the sender, so every component is sanitized: a
patient ID such as ``../../etc``, one with kanji, NUL or 300 characters still
lands inside the archive, and two different IDs never share a folder. A clean
value is used as it is; any value that had to be changed gets a short hash of
the original appended after a ``~``, a character no clean value contains, so a
changed value can never equal a clean one, and two changed values differ by
their hashes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import PurePosixPath

_SAFE = re.compile(r"[A-Za-z0-9._-]")
MAX_COMPONENT = 64
HASH_LENGTH = 12


def safe_component(value: str, empty: str) -> str:
    """A file-name component for `value`: kept as is when clean, else made safe.

    `empty` stands in for an empty value (an anonymous patient, say); it gets
    the ``~`` mark too, so a patient whose ID really is "NOID" has a folder
    of their own.
    """
    value = value.strip()
    if not value:
        return f"{empty}~"
    kept = "".join(c if _SAFE.fullmatch(c) else "_" for c in value)
    clean = kept == value and not value.startswith(".") and len(value) <= MAX_COMPONENT
    if clean:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LENGTH]
    kept = kept.lstrip(".")[: MAX_COMPONENT - HASH_LENGTH - 1]
    return f"{kept}~{digest}"


def date_folder(study_date: str, received: dt.datetime) -> str:
    """The study's date when it is a real date, else the day we received it."""
    text = study_date.strip()
    if len(text) == 8 and text.isdigit():
        try:
            dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
            return text
        except ValueError:
            pass
    return received.strftime("%Y%m%d")


def instance_path(
    *, study_date: str, modality: str, patient_id: str, sop_instance_uid: str, received: dt.datetime
) -> PurePosixPath:
    """Path of an instance relative to the archive root."""
    folder = f"{safe_component(modality, 'OT')}-{safe_component(patient_id, 'NOID')}"
    name = safe_component(sop_instance_uid, "NOUID") + ".dcm"
    return PurePosixPath(date_folder(study_date, received), folder, name)
