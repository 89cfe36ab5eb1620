"""The three format classes a site chooses between, and the syntaxes in each.

Clinics speak of "uncompressed", "lossless" and "lossy", not of UIDs; the
configuration accepts either. JPEG 2000 (.91) and HTJ2K (.203) may carry
reversible data, but DICOM names them the lossy-capable syntaxes and the
policy treats them as lossy, which never loses quality for nothing: their
data is never re-encoded "losslessly" into something bigger.
"""

from __future__ import annotations

from typing import Literal

from pydicom import uid

FormatClass = Literal["uncompressed", "lossless", "lossy"]
CLASSES: tuple[FormatClass, ...] = ("uncompressed", "lossless", "lossy")

UNCOMPRESSED: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
)
LOSSLESS: tuple[str, ...] = (
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.RLELossless,
)
LOSSY: tuple[str, ...] = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLSNearLossless,
    uid.JPEG2000,
    uid.HTJ2K,
)

# What every DICOM node must accept, in the order we offer it (PS3.5 A.1, A.2).
UNIVERSAL: tuple[str, ...] = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)

_BY_CLASS: dict[str, tuple[str, ...]] = {
    "uncompressed": UNCOMPRESSED,
    "lossless": LOSSLESS,
    "lossy": LOSSY,
}


def class_of(transfer_syntax: str) -> FormatClass | None:
    """The class of a transfer syntax, None for video and other syntaxes we never convert."""
    for name, members in _BY_CLASS.items():
        if transfer_syntax in members:
            return name  # type: ignore[return-value]
    return None


def members(format_class: str) -> tuple[str, ...]:
    return _BY_CLASS[format_class]


def name_of(transfer_syntax: str) -> str:
    return uid.UID(transfer_syntax).name or transfer_syntax


def expand(accepts: list[str] | tuple[str, ...]) -> list[str]:
    """A destination's `accepts` list (classes or UIDs, by preference) as UIDs, in order."""
    expanded: list[str] = []
    for entry in accepts:
        for syntax in _BY_CLASS.get(entry, (entry,)):
            if syntax not in expanded:
                expanded.append(syntax)
    return expanded


def resolve(value: str) -> str | None:
    """A transfer syntax given as a UID or as pydicom's keyword (JPEGLSLossless), or None."""
    if value in UNCOMPRESSED + LOSSLESS + LOSSY:
        return value
    found = getattr(uid, value, None)
    return str(found) if isinstance(found, uid.UID) and found.is_transfer_syntax else None
