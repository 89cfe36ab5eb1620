"""Decoding a stored object to native (uncompressed) little endian pixel data.

Decoding uses pydicom's plugins only (pylibjpeg, pyjpegls, pylibjpeg-openjpeg,
pylibjpeg-rle): when they reject a stream, the object is refused, never
handed to a more lenient decoder. libjpeg-turbo (imagecodecs) turns a JPEG
with garbage in its entropy data into an image without a word, so it is
used only as a second opinion on a stream pydicom decoded (`verify.py`).

Colour: decoding keeps the samples the stream holds. RLE, JPEG-LS, JPEG
Lossless and uncompressed YBR_FULL stay YBR_FULL (as DCMTK's dcmdrle keeps
them): converting them to RGB is a rounding step that cannot be undone. The
two exceptions are where the codestream itself carries a colour transform:
lossy JPEG (YCbCr inside the JFIF-style stream, decoded to RGB as DCMTK's
dcmdjpeg does by default) and JPEG 2000's YBR_RCT/YBR_ICT (the decoder
undoes the component transform and the result is RGB, PS3.5 8.2.4).
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset

from appliance.transcode.errors import CannotConvert, ConversionRefused, one_line
from appliance.transcode.streams import check_frames
from appliance.transcode.syntaxes import name_of

NATIVE_LE = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian)
# Streams whose colour lives in YCbCr inside the codestream: decoded to RGB.
LOSSY_JPEG = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit)
SWAP_WIDTH = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def native_copy(ds: Dataset, source: str, in_place: bool = False) -> Dataset:
    """`ds` (or a deep copy of it) with native little endian pixel data; refused if undecodable."""
    out = ds if in_place else copy.deepcopy(ds)
    if source in NATIVE_LE:
        return out
    if source == uid.ExplicitVRBigEndian:
        swap_to_little_endian(out)
        out.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        return out
    if "PixelData" not in out:
        return out
    if not uid.UID(source).is_encapsulated:
        raise CannotConvert(f"{name_of(source)}: no decoder for this syntax")
    check_frames(out, source)
    # pyjpegls decodes JPEG-LS ~4x faster than pylibjpeg-libjpeg, pydicom's first choice
    # (docs/PERFORMANCE.md, codecs); the default order stays the fallback.
    plugin = "pyjpegls" if source in (uid.JPEGLSLossless, uid.JPEGLSNearLossless) else ""
    as_rgb = source in LOSSY_JPEG
    try:
        try:
            out.decompress(as_rgb=as_rgb, generate_instance_uid=False, decoding_plugin=plugin)
        except Exception:
            if not plugin:
                raise
            out.decompress(as_rgb=as_rgb, generate_instance_uid=False)
    except Exception as exc:  # pydicom's plugins raise several types; none may pass as an image
        reason = f"{name_of(source)} stream rejected by the decoder: {one_line(exc)}"
        raise ConversionRefused(reason) from None
    return out


def swap_to_little_endian(ds: Dataset) -> None:
    """Big endian to little endian: swap every OW/OL/OF/OD/OV value by its width.

    Numeric VRs are re-encoded by pydicom from their values; "other" VRs are
    raw bytes (pixel data, LUT data, overlays) and must be swapped by hand.
    """
    pixel_width = max(2, int(ds.get("BitsAllocated", 16)) // 8)
    for element in ds.iterall():
        width = SWAP_WIDTH.get(element.VR)
        if element.tag == 0x7FE00010 and width:
            width = pixel_width  # 32-bit dose grids swap by their sample width
        if width and isinstance(element.value, bytes) and len(element.value) % width == 0:
            element.value = (
                np.frombuffer(element.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
            )
    ds.set_original_encoding(False, True, ds.original_character_set)


__all__ = ["LOSSY_JPEG", "NATIVE_LE", "native_copy", "swap_to_little_endian"]
