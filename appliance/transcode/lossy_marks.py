"""Marking a lossy result as PS3.3 C.7.6.1.1.5 asks.

Lossy Image Compression (0028,2110) = "01" and never reset; Lossy Image
Compression Ratio (0028,2112) and Method (0028,2114) get one more value per
lossy step (C.7.6.1.1.5.1/.2); Image Type value 1 becomes DERIVED, and "if
the predecessor was a DICOM image, then the Image shall receive a new SOP
Instance UID", with the predecessor referenced in Source Image Sequence
(purpose DCM 121320, "Uncompressed predecessor").
"""

from __future__ import annotations

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from appliance.transcode.syntaxes import name_of

METHODS = {  # Lossy Image Compression Method defined terms (PS3.3 C.7.6.1.1.5.1)
    uid.JPEGBaseline8Bit: "ISO_10918_1",
    uid.JPEGExtended12Bit: "ISO_10918_1",
    uid.JPEGLSNearLossless: "ISO_14495_1",
    uid.JPEG2000: "ISO_15444_1",
    uid.HTJ2K: "ISO_15444_15",
}


def mark_lossy(ds: Dataset, target: str, ratio: float, derived_uid: str | None = None) -> None:
    """PS3.3 C.7.6.1.1.5: flag, ratio and method; DERIVED; a new SOP Instance UID."""
    ratios = [str(v) for v in values_of(ds.get("LossyImageCompressionRatio"))]
    methods = [str(v) for v in values_of(ds.get("LossyImageCompressionMethod"))]
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"[:16]]
    ds.LossyImageCompressionMethod = [*methods, METHODS[target]]
    image_type = list(values_of(ds.get("ImageType"))) or ["DERIVED", "PRIMARY"]
    image_type[0] = "DERIVED"
    ds.ImageType = image_type
    description = f"Lossy compressed {name_of(target)} {ratio:.1f}:1 by gateway"
    ds.DerivationDescription = description[:1024]
    predecessor = Dataset()
    predecessor.ReferencedSOPClassUID = ds.SOPClassUID
    predecessor.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue = "121320"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Uncompressed predecessor"
    predecessor.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.SourceImageSequence = Sequence([*ds.get("SourceImageSequence", []), predecessor])
    ds.SOPInstanceUID = derived_uid or uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def values_of(value: object) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


__all__ = ["METHODS", "mark_lossy"]
