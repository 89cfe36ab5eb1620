"""Judging one cell of the conversion matrix: equal to the source, or kept as received.

The source is what independent decoders make of the input (tests/
reference_decoders.py): DCMTK or GDCM, and pydicom. When they disagree, or
one refuses the stream, nobody can say what the image is: every conversion
of it must be refused and the original kept. Otherwise a result must show
that image: exactly (same stored values, same colour space) for lossless
targets from lossless sources, within MIN_PSNR for lossy targets (colour
compared in RGB), within SOURCE_AGREEMENT_PSNR of each decoder's view of a
lossy source. Index-valued (PALETTE COLOR) and 1-bit data are never lossy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid

from appliance.transcode.verify import DEFAULT_MIN_PSNR
from tests.conversion_inputs_encoded import generate
from tests.reference_decoders import (
    LOSSY_SYNTAXES,
    Decoded,
    dciodvfy_errors,
    difference,
    jpeg_ls_near,
    pydicom_decode,
    reference,
)

# A lossy result must reach the PSNR (over the full Bits Stored range) the appliance
# promises by default ([storage] lossy_min_psnr), measured here by other decoders.
MIN_PSNR = DEFAULT_MIN_PSNR
# Two decoders of one lossy JPEG stream round differently (IDCT, chroma upsampling):
# they agree when within 40 dB of each other; a corrupt stream is far below.
SOURCE_AGREEMENT_PSNR = 40.0
LOSSY_TARGETS = LOSSY_SYNTAXES


@dataclass(frozen=True)
class Source:
    kind: str
    path: Path
    syntax: str
    sop_instance_uid: str
    lossy: bool  # the source itself is lossy-compressed
    views: tuple[Decoded, ...]  # reference tool's, then pydicom's
    untrusted: str  # why the decoders disagree, "" when they agree
    index_valued: bool  # PALETTE COLOR or 1-bit: never lossy
    dciodvfy: frozenset[str]


def read(path: Path, **kwargs) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kwargs)


class Sources:
    """Input kinds generated on first use into one directory, judged once each."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.get = cache(self._make)

    def _make(self, kind: str) -> Source:
        path = generate(kind, self.directory)
        ds = read(path)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        lossy = syntax in LOSSY_SYNTAXES
        views = (reference(path), pydicom_decode(path))
        untrusted = difference(views[0], views[1], SOURCE_AGREEMENT_PSNR if lossy else None) or ""
        index_valued = ds.get("PhotometricInterpretation") == "PALETTE COLOR" or ds.get("BitsAllocated") == 1
        return Source(kind, path, syntax, str(ds.SOPInstanceUID), lossy, views, untrusted, index_valued,
                      dciodvfy_errors(path))


def output_problems(source: Source, target: str, out: Path, lossy_step: bool | None = None) -> list[str]:
    """What is wrong with `out` as `source` converted to `target`; [] when nothing is.

    `lossy_step` is whether the conversion claims to have lost information
    (the target is lossy); None reads it from the target syntax.
    """
    problems: list[str] = []
    if source.untrusted:
        problems.append(f"converted although the source's decoders disagree ({source.untrusted})")
    ds = read(out)
    original = read(source.path, stop_before_pixels=True)
    if str(ds.file_meta.TransferSyntaxUID) != target:
        problems.append(f"written as {ds.file_meta.TransferSyntaxUID.name}, asked for {uid.UID(target).name}")
    lossy = target in LOSSY_TARGETS if lossy_step is None else lossy_step
    if lossy and target != source.syntax:
        if source.index_valued:
            problems.append("index-valued or 1-bit data lossy-compressed")
        if ds.get("LossyImageCompression") != "01":
            problems.append("lossy result without Lossy Image Compression 01")
        if ds.SOPInstanceUID == source.sop_instance_uid:
            problems.append("lossy result kept the SOP Instance UID of its original")
    else:
        if ds.SOPInstanceUID != source.sop_instance_uid:
            problems.append("lossless result has a new SOP Instance UID")
        if ds.get("LossyImageCompression") == "01" and original.get("LossyImageCompression") != "01":
            problems.append("lossless step marked the image lossy-compressed")
        if original.get("LossyImageCompression") == "01" and ds.get("LossyImageCompression") != "01":
            problems.append("lossless step reset Lossy Image Compression (PS3.3: never reset)")
    if lossy and target != source.syntax and not ds.get("LossyImageCompressionMethod"):
        problems.append("lossy result without Lossy Image Compression Method")
    for keyword in ("BitsStored", "PixelRepresentation", "NumberOfFrames", "SamplesPerPixel", "Rows",
                    "Columns"):
        if keyword in original and str(ds.get(keyword)) != str(original.get(keyword)):
            problems.append(f"{keyword} {ds.get(keyword)} instead of {original.get(keyword)}")
    if source.untrusted:
        return problems
    bound = MIN_PSNR if lossy else SOURCE_AGREEMENT_PSNR if source.lossy else None
    near = jpeg_ls_near(out) if target == uid.JPEGLSNearLossless and not source.lossy else None
    for got in (reference(out), pydicom_decode(out)):
        for expected in source.views:
            wrong = difference(expected, got, bound) or worst_error(expected, got, lossy, near)
            if wrong:
                problems.append(f"against {expected.decoder}'s view of the source, {wrong}")
    new_errors = dciodvfy_errors(out) - source.dciodvfy
    if new_errors:
        problems.append("dciodvfy: " + "; ".join(sorted(new_errors))[:400])
    return problems


def worst_error(expected: Decoded, got: Decoded, lossy: bool, near: int | None) -> str | None:
    """The single worst sample of a lossy result, which a PSNR averages away.

    Near-lossless JPEG-LS keeps every sample within NEAR. Other lossy codecs
    blur greyscale images but never move a sample by a quarter of the Bits
    Stored range: that is a sign or a wrap-around error (black turned white),
    not compression. (Colour is exempt: 4:2:2 JPEG misplaces chroma at edges.)
    """
    if not lossy or expected.values is None or got.values is None or expected.space in ("RGB", "YBR_FULL"):
        return None
    if expected.values.shape != got.values.shape:
        return None  # difference() has said so
    bottom = -(1 << (expected.bits_stored - 1)) if expected.signed else 0
    top = (1 << (expected.bits_stored - int(expected.signed))) - 1
    outside = int(np.count_nonzero((got.values < bottom) | (got.values > top)))
    if outside:
        return (f"{got.decoder}: {outside} sample(s) outside the {expected.bits_stored}-bit range "
                f"{bottom}..{top} (got {got.values.min()}..{got.values.max()}): Bits Stored cannot hold them")
    error = np.abs(expected.values - got.values)
    worst = int(error.max(initial=0))
    limit = near if near is not None else (1 << expected.bits_stored) // 4
    if worst > limit:
        where = np.unravel_index(int(error.argmax()), error.shape)
        named = f"NEAR = {near}" if near is not None else f"{limit}"
        return (f"{got.decoder}: a sample off by {worst} (limit {named}):"
                f" {int(expected.values[where])} became {int(got.values[where])}")
    return None


def same_pixels(a: pydicom.Dataset, b: pydicom.Dataset) -> bool:
    """The same pixel bytes in the same syntax: an object kept as it was."""
    if a.file_meta.TransferSyntaxUID != b.file_meta.TransferSyntaxUID:
        return False
    keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in b), None)
    return keyword is not None and keyword in a and bytes(a[keyword].value) == bytes(b[keyword].value)
