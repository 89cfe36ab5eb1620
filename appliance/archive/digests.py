"""The two digests the archive keeps: of the whole file, and of the dataset alone."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO


def file_digest(fp: BinaryIO) -> str:
    """sha256 of the whole file: what copies on external disks are verified against.

    One pass per image: on a Raspberry Pi 4 (no SHA instructions) each pass
    over a 512 KB CT slice costs several milliseconds.
    """
    fp.seek(0)
    return hashlib.file_digest(fp, "sha256").hexdigest()


def dataset_digest(path: Path, dataset_offset: int) -> str:
    """sha256 of the dataset alone, past the file meta.

    Two files of the same instance that differ only in their file meta (one
    from C-STORE, one from a CD) hold the same image: this digest decides
    "received again, identical". Computed only when the SOP Instance UID is
    already known, which is rare.
    """
    with open(path, "rb") as fp:
        fp.seek(dataset_offset)
        return hashlib.file_digest(fp, "sha256").hexdigest()


def stored_dataset_digest(existing: dict, path: Path) -> str:
    if existing.get("dataset_sha256"):
        return existing["dataset_sha256"]
    from appliance.dicom.structure import IncompleteDataset, check_part10

    try:
        with open(path, "rb") as fp:
            offset = check_part10(fp, path.stat().st_size).dataset_offset
        return dataset_digest(path, offset)
    except (IncompleteDataset, OSError):
        return ""  # a damaged stored copy is never "identical": the new one replaces it
