"""A raw dataset (no preamble, no file meta: older CDs) given a Part 10 header."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import FileMetaDataset

from appliance.archive.record import UnreadableObject


def write_part10_from_raw(src: BinaryIO, temp: Path) -> None:
    """Give a raw dataset (no preamble, no file meta) a Part 10 header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(src, force=True)
            ds.SOPInstanceUID  # noqa: B018 - identity must be readable
            ds.SOPClassUID  # noqa: B018
        except Exception as exc:
            raise UnreadableObject(f"not a DICOM file: {exc}") from None
    if len(ds) == 0:
        raise UnreadableObject("not a DICOM file")
    implicit, little = ds.original_encoding
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if implicit:
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    elif little:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.file_meta = meta
    ds.save_as(temp, enforce_file_format=True)
