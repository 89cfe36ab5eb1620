"""Convert an object's pixel data to another transfer syntax, verified; nothing else changes.

The one conversion function of the appliance: the store format, every
forward conversion and `appliance transcode` call `convert`. Only the pixel
data is re-encoded. Every other element, private tags and sequences
included, is carried over from the object itself, never rebuilt from a
template. The attributes the standard ties to compression follow:

- Transfer Syntax UID; Photometric Interpretation where a codec changes it
  (JPEG baseline colour is YBR_FULL_422; RGB in JPEG 2000 becomes YBR_RCT /
  YBR_ICT; lossy JPEG decoded becomes RGB).
- Lossy compression: marked as PS3.3 C.7.6.1.1.5 asks (`lossy_marks.py`),
  with a new SOP Instance UID.
- Lossless steps and decompression keep the SOP Instance UID: the image is
  the same image (pydicom mints a new one by default: we pass
  generate_instance_uid=False everywhere).

Before a result is returned it is decoded and compared with the source
(`verify.PixelCheck`): exact for lossless targets, colour model and a PSNR
bound for lossy ones. A failed check raises ConversionRefused and the
caller keeps the original. Explicit VR Big Endian (retired, PS3.5 A.3) is
read and kept as stored, never produced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from appliance.transcode.encode import encode
from appliance.transcode.errors import CannotConvert, ConversionRefused, one_line
from appliance.transcode.lossy_marks import mark_lossy
from appliance.transcode.native import native_copy
from appliance.transcode.syntaxes import LOSSY, UNCOMPRESSED, class_of, name_of
from appliance.transcode.verify import DEFAULT_MIN_PSNR, PixelCheck, refuse_lossy_for


@dataclass(frozen=True)
class Conversion:
    dataset: Dataset
    source_syntax: str
    target_syntax: str
    lossy: bool  # this step lost information
    ratio: float | None  # native size / encoded size, for lossy steps
    psnr: float | None = None  # dB against the source, for lossy steps that were verified


@dataclass(frozen=True)
class Quality:
    """How hard lossy encoders squeeze: one knob ([storage] lossy_quality, 1-100).

    - JPEG (baseline, extended): the libjpeg quality, as is.
    - JPEG-LS near-lossless: NEAR = round((100 - q) / 10), at least 1.
    - JPEG 2000: a compression ratio of 2 + (100 - q) / 2 (q = 90 -> 7:1,
      q = 80 -> 12:1), the figure radiology guidelines speak in.
    - HTJ2K: OpenJPH's quantisation step 0.0001 x 2^((100 - q) / 10).
    """

    level: int = 90

    def jpeg_ls_near(self) -> int:
        return max(1, round((100 - self.level) / 10))

    def j2k_ratio(self) -> float:
        return 2 + (100 - self.level) / 2

    def htj2k_qstep(self) -> float:
        return 0.0001 * 2 ** ((100 - self.level) / 10)


def convert(
    ds: Dataset,
    target: str,
    quality: Quality | None = None,
    derived_uid: str | None = None,
    in_place: bool = False,
    *,
    verify: bool = True,
    min_psnr: float = DEFAULT_MIN_PSNR,
) -> Conversion:
    """`ds` with its pixel data in `target`: a copy, or `ds` itself when `in_place`.

    `derived_uid` is the SOP Instance UID a lossy result gets (a fresh one if
    None): the store pipeline derives it from the original so a retry makes
    the same instance. `in_place` is for a caller that read the dataset just
    for this conversion (the store pipeline): the deep copy is a third of the
    cost of a fast lossless encode. `verify=False` exists for `make bench`
    only, to measure what the check costs.

    Raises CannotConvert when the target cannot hold the image, and its
    subclass ConversionRefused when the source or the result fails the check.
    """
    quality = quality or Quality()
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return Conversion(ds if in_place else copy.deepcopy(ds), source, target, False, None)
    _refuse_by_rule(ds, source, target)
    if "PixelData" not in ds:
        out = native_copy(ds, source, in_place)  # SR, KO, PR...: only the encoding changes
        out.file_meta.TransferSyntaxUID = target
        _match_encoding(out, target)
        return Conversion(out, source, target, False, None)
    check = PixelCheck(ds, source, target) if verify else None
    native = native_copy(ds, source, in_place)
    if check:
        check.decoded(native)
    if target in UNCOMPRESSED:
        native.file_meta.TransferSyntaxUID = target
        result = Conversion(native, source, target, False, None)
    else:
        if check:
            check.before_encoding()
        result = _encode(native, source, target, quality, derived_uid)
    try:
        _match_encoding(result.dataset, target)
    except Exception as exc:  # an element pydicom cannot parse: bad input, not a bug here
        raise ConversionRefused(f"an element cannot be decoded for re-encoding: {one_line(exc)}") from None
    if check:
        near = quality.jpeg_ls_near() if target == uid.JPEGLSNearLossless else None
        measured = check.judge(result.dataset, target, min_psnr, max_error=near)
        if measured is not None:
            result = Conversion(result.dataset, source, target, result.lossy, result.ratio, measured)
    return result


def _refuse_by_rule(ds: Dataset, source: str, target: str) -> None:
    """Conversions the appliance never makes, whatever the image."""
    if class_of(source) is None or class_of(target) is None:
        raise CannotConvert(f"{name_of(source)} -> {name_of(target)}: video and unknown "
                            "syntaxes are kept as they are")
    if target == uid.ExplicitVRBigEndian:
        raise CannotConvert("Explicit VR Big Endian is retired (PS3.5 A.3): kept when received, "
                            "never produced")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            if target not in UNCOMPRESSED:
                raise CannotConvert("float pixel data can only be sent uncompressed")
        elif target not in UNCOMPRESSED:
            raise CannotConvert("object has no pixel data to compress")
    elif target in LOSSY:
        refuse_lossy_for(ds, target)


def _match_encoding(ds: Dataset, target: str) -> None:
    """Make the dataset's own encoding agree with its new transfer syntax.

    pydicom keeps the encoding a dataset was read in, and pynetdicom refuses
    to send an Explicit VR dataset as Implicit: every element is decoded
    first (so none is left to be parsed in the wrong encoding), then the
    encoding is set to the target's.
    """
    implicit = target == uid.ImplicitVRLittleEndian
    if ds.original_encoding != (implicit, True):
        for _element in ds.iterall():
            pass
    ds.set_original_encoding(implicit, True, ds.original_character_set)


def _encode(native: Dataset, source: str, target: str, quality: Quality,
            derived_uid: str | None) -> Conversion:
    try:
        encoded, native_size = encode(native, target, quality)
    except CannotConvert:
        raise
    except Exception as exc:  # codecs raise many types; the caller keeps the original
        raise CannotConvert(f"{name_of(target)} encoder failed: {one_line(exc)}") from None
    native.PixelData = encapsulate(encoded, has_bot=len(encoded) > 1)
    native["PixelData"].VR = "OB"
    native["PixelData"].is_undefined_length = True
    native.file_meta.TransferSyntaxUID = target
    lossy = target in LOSSY
    ratio = None
    if lossy:
        ratio = native_size / max(1, sum(len(f) for f in encoded))
        mark_lossy(native, target, ratio, derived_uid)
    return Conversion(native, source, target, lossy, ratio)


__all__ = ["CannotConvert", "Conversion", "ConversionRefused", "Quality", "convert"]
