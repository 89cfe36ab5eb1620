"""Encoded input kinds for the conversion matrix, made by the tools modalities use.

DCMTK (dcmcjpeg, dcmcjpls, dcmcrle) encodes JPEG, JPEG-LS and RLE; GDCM
(gdcmconv) JPEG 2000 lossless; pydicom's OpenJPEG encoder JPEG 2000 lossy;
imagecodecs (OpenJPH) HTJ2K, which neither Debian's DCMTK nor GDCM write.
Then the damaged ones a gateway meets in the field: truncated streams of
every codec, a garbled JPEG bitstream, one codec's bytes labelled as
another's, and a JPEG whose frame is smaller than Rows × Columns.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import encapsulate, generate_frames

from tests.conversion_inputs import NATIVE, ramp, write


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stdout}{done.stderr}")


def _native(kind: str, directory: Path) -> Path:
    return write(NATIVE[kind](), directory / f"native-{kind}.dcm")


def _tool(kind: str, *command: str) -> Callable[[Path, Path], None]:
    """Encode the native `kind` with a command line tool taking IN OUT."""

    def make(directory: Path, out: Path) -> None:
        _run(*command, str(_native(kind, directory)), str(out))

    return make


def _pydicom_j2k_lossy(directory: Path, out: Path) -> None:
    ds = NATIVE["u12"]()
    ds.compress(uid.JPEG2000, j2k_cr=[8], generate_instance_uid=False)
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_15444_1"
    ds.LossyImageCompressionRatio = 8
    ds.save_as(out, enforce_file_format=True)


def _htj2k(kind: str, lossless: bool, headroom: int = 0) -> Callable[[Path, Path], None]:
    """HTJ2K by OpenJPH. `headroom` keeps values that far from 0 and the maximum: a lossy
    stream whose reconstruction overshoots the maximum is read differently by OpenJPH
    (which wraps 256 to 0) and OpenJPEG (which clips to 255)."""

    def make(directory: Path, out: Path) -> None:
        ds = NATIVE[kind]()
        array = ds.pixel_array
        if headroom:
            top = (1 << int(ds.BitsStored)) - 1
            array = np.clip(array, headroom, top - headroom).astype(array.dtype)
            ds.PixelData = array.tobytes()
        frames = array if int(ds.get("NumberOfFrames", 1) or 1) > 1 else array[None]
        encoded = [imagecodecs.htj2k_encode(np.ascontiguousarray(f), reversible=lossless,
                                            level=None if lossless else 0.004) for f in frames]
        _encapsulated(ds, encoded, uid.HTJ2KLossless if lossless else uid.HTJ2K)
        if not lossless:
            ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_15444_15"
        ds.save_as(out, enforce_file_format=True)

    return make


def _encapsulated(ds: pydicom.Dataset, frames: list[bytes], syntax: str) -> None:
    ds.PixelData = encapsulate(frames, has_bot=len(frames) > 1)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax


def _damaged(source: str, damage: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    """An ENCODED kind whose first frame `damage` changes; header and syntax left as they were."""

    def make(directory: Path, out: Path) -> None:
        clean = directory / f"clean-{source}.dcm"
        ENCODED[source](directory, clean)
        ds = pydicom.dcmread(clean)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        frames[0] = damage(frames[0])
        _encapsulated(ds, frames, str(ds.file_meta.TransferSyntaxUID))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
        ds.save_as(out, enforce_file_format=True)

    return make


def truncate(frame: bytes) -> bytes:
    """The first 60 % of the stream: a transfer cut short, no EOI marker."""
    return frame[: len(frame) * 6 // 10]


def garble(frame: bytes) -> bytes:
    """Scan data overwritten in the middle (bytes chosen to make no marker): a bad sector."""
    middle = len(frame) // 2
    junk = bytes((n * 37 + 11) % 0xFE for n in range(48))
    return frame[:middle] + junk + frame[middle + 48:]


def _relabelled(source: str, syntax: str) -> Callable[[Path, Path], None]:
    """An ENCODED kind's bytes under another transfer syntax."""

    def make(directory: Path, out: Path) -> None:
        ENCODED[source](directory, out)
        ds = pydicom.dcmread(out)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
        ds.save_as(out, enforce_file_format=True)

    return make


def _size_mismatch(directory: Path, out: Path) -> None:
    """A JPEG Baseline frame of 24 × 32 in an object that says 40 × 48."""
    ds = NATIVE["u8"]()
    small = ramp((24, 32), 0, 255, 40).astype(np.uint8)
    _encapsulated(ds, [imagecodecs.jpeg8_encode(small, level=90)], uid.JPEGBaseline8Bit)
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.save_as(out, enforce_file_format=True)


ENCODED: dict[str, Callable[[Path, Path], None]] = {
    "rle_u12": _tool("u12", "dcmcrle"),
    "rle_rgb": _tool("rgb_planar0", "dcmcrle"),
    "rle_ybr_full": _tool("ybr_full", "dcmcrle"),
    "rle_multiframe_u12": _tool("multiframe_u12", "dcmcrle"),
    "jpeg_baseline_grey": _tool("u8", "dcmcjpeg", "+eb", "+q", "90"),
    "jpeg_baseline_ybr422": _tool("rgb_planar0", "dcmcjpeg", "+eb", "+q", "90"),
    "jpeg_baseline_ybr_full": _tool("rgb_planar0", "dcmcjpeg", "+eb", "+q", "90", "+s4"),
    "jpeg_baseline_multiframe": _tool("multiframe_rgb", "dcmcjpeg", "+eb", "+q", "90"),
    "jpeg_extended_12": _tool("u12", "dcmcjpeg", "+ee", "+q", "90"),
    "jpeg_lossless_sv1_u16": _tool("u16", "dcmcjpeg", "+e1"),
    "jpeg_lossless_p14_s16": _tool("s16", "dcmcjpeg", "+el"),
    "jpegls_u8": _tool("u8", "dcmcjpls"),
    "jpegls_u12": _tool("u12", "dcmcjpls"),
    "jpegls_rgb_planar1": _tool("rgb_planar1", "dcmcjpls"),
    "jpegls_s12_unextended": _tool("s12_unextended", "dcmcjpls"),
    "jpegls_near_u16": _tool("u16", "dcmcjpls", "+en", "+md", "2"),
    "j2k_lossless_u12": _tool("u12", "gdcmconv", "--j2k"),
    "j2k_lossless_rgb": _tool("rgb_planar0", "gdcmconv", "--j2k"),
    "j2k_lossy_u12": _pydicom_j2k_lossy,
    "htj2k_lossless_u12": _htj2k("u12", True),
    "htj2k_lossy_u8": _htj2k("u8", False, headroom=8),
    "htj2k_lossy_u8_overshoot": _htj2k("u8", False),
}
ENCODED.update({
    "corrupt_jpeg_truncated": _damaged("jpeg_baseline_grey", truncate),
    "corrupt_jpeg_garbled": _damaged("jpeg_baseline_grey", garble),
    # Each of these, one decoder of the two still "decodes": dcmdrle the RLE, pydicom the
    # JPEG-LS, OpenJPH the HTJ2K; GDCM and pydicom both refuse the JPEG 2000.
    "corrupt_rle_truncated": _damaged("rle_u12", truncate),
    "corrupt_jpegls_truncated": _damaged("jpegls_u12", truncate),
    "corrupt_j2k_truncated": _damaged("j2k_lossless_u12", truncate),
    "corrupt_htj2k_truncated": _damaged("htj2k_lossless_u12", truncate),
    # A vendor's mislabelling: the bytes of one codec under another's transfer syntax.
    "mislabelled_jpegls_as_baseline": _relabelled("jpegls_u8", uid.JPEGBaseline8Bit),
    "mislabelled_j2k_as_jpegls": _relabelled("j2k_lossless_u12", uid.JPEGLSLossless),
    "jpeg_size_mismatch": _size_mismatch,
})

KINDS: list[str] = [*NATIVE, *ENCODED]


def generate(kind: str, directory: Path) -> Path:
    """Write one input kind into `directory`; its path (named after the kind)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{kind}.dcm"
    if kind in NATIVE:
        return write(NATIVE[kind](), out)
    ENCODED[kind](directory, out)
    return out
