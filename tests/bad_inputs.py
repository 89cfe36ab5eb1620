"""Inputs that must never come out as a different image: valid-but-unusual, corrupt, mislabelled.

Each builder returns a pydicom Dataset with its own fresh SOP Instance UID,
written by `save(ds, path)`. The images are small (pydicom's test files or
a few hundred pixels) so the tests that send them through real services
stay quick.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom import examples, uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space


def _fresh(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _encapsulated(ds: Dataset, frames: list[bytes], syntax: str) -> Dataset:
    ds.PixelData = encapsulate(frames, has_bot=len(frames) > 1)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    ds.set_original_encoding(False, True)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_12bit(signed: bool) -> Dataset:
    """pydicom's CT_small (128x128) as 12 bits stored in 16, values over the whole 12-bit range."""
    ds = _fresh(examples.ct)
    values = np.arange(128 * 128).reshape(128, 128) % 4096
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelRepresentation = int(signed)
    ds.PixelData = ((values - 2048) if signed else values).astype("<i2" if signed else "<u2").tobytes()
    return ds


def signed_12bit_not_sign_extended() -> Dataset:
    """Valid DICOM: -2048..2047 in the low 12 bits, bits 12-15 zero (not sign-extended)."""
    ds = ct_12bit(signed=True)
    raw = np.frombuffer(ds.PixelData, "<u2") & 0x0FFF
    ds.PixelData = raw.astype("<u2").tobytes()
    return ds


def unsigned_12bit_high_bits_set() -> Dataset:
    """Unsigned 12-bit data with bits 12-15 set (overlay-style bits above Bits Stored)."""
    ds = ct_12bit(signed=False)
    ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | 0xF000).astype("<u2").tobytes()
    return ds


def rgb() -> Dataset:
    return _fresh(examples.rgb_color)  # 240x320 RGB, Explicit VR Little Endian


def ybr_full() -> Dataset:
    """The RGB picture as native YBR_FULL samples (what an ultrasound machine may send)."""
    ds = rgb()
    ds.PixelData = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    return ds


def ybr_full_422() -> Dataset:
    """The RGB picture as native YBR_FULL_422 (Y Y Cb Cr per pixel pair, PS3.3 C.7.6.3.1.2)."""
    ds = rgb()
    ybr = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL")
    packed = np.empty((ds.Rows, ds.Columns * 2), np.uint8)
    packed[:, 0::4], packed[:, 1::4] = ybr[:, 0::2, 0], ybr[:, 1::2, 0]
    packed[:, 2::4] = ((ybr[:, 0::2, 1].astype(int) + ybr[:, 1::2, 1]) // 2).astype(np.uint8)
    packed[:, 3::4] = ((ybr[:, 0::2, 2].astype(int) + ybr[:, 1::2, 2]) // 2).astype(np.uint8)
    ds.PixelData = packed.tobytes()
    ds.PhotometricInterpretation = "YBR_FULL_422"
    return ds


def rle_ybr_full() -> Dataset:
    """YBR_FULL samples in RLE Lossless (PS3.5 G: RLE keeps whatever samples it is given)."""
    ds = ybr_full()
    ds.compress(uid.RLELossless, generate_instance_uid=False)
    return ds


def palette() -> Dataset:
    return _fresh(examples.palette_color)  # 8-bit PALETTE COLOR, 350x800


def jpeg_baseline(rows: int | None = None, columns: int | None = None) -> Dataset:
    """A clean JPEG Baseline RGB picture (YBR_FULL_422), optionally labelled with another size."""
    ds = rgb()
    stream = imagecodecs.jpeg8_encode(ds.pixel_array, level=90, outcolorspace="YCbCr", subsampling="422")
    _encapsulated(ds, [stream], uid.JPEGBaseline8Bit)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    if rows:
        ds.Rows, ds.Columns = rows, columns
    return ds


def _stream(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def corrupt_jpeg(kind: str) -> Dataset:
    """JPEG Baseline damaged three ways a disk or a network can damage it.

    - "garbage": 2,000 random bytes in the entropy-coded data; libjpeg
      refuses it, libjpeg-turbo (imagecodecs) "decodes" it;
    - "truncated": the scan cut in half and an EOI put back; every decoder
      returns an image, grey where the data was lost;
    - "tables": the quantisation tables overwritten; libjpeg reports an error.
    """
    ds = jpeg_baseline()
    stream = _stream(ds)
    scan = stream.find(b"\xff\xda")
    if kind == "garbage":
        noise = np.random.default_rng(7).integers(0, 255, 2000, dtype=np.uint8).tobytes()
        stream = stream[:scan + 200] + noise + stream[scan + 2200:]
    elif kind == "truncated":
        stream = stream[:scan + (len(stream) - scan) // 2] + b"\xff\xd9"
    elif kind == "tables":
        stream = stream[:20] + bytes(50) + stream[70:]
    else:
        raise ValueError(kind)
    return _encapsulated(ds, [stream + b"\x00" * (len(stream) % 2)], uid.JPEGBaseline8Bit)


def jpeg_labelled_jpeg_ls() -> Dataset:
    """A JPEG Baseline stream under the JPEG-LS Lossless transfer syntax (a mislabelled file)."""
    ds = jpeg_baseline()
    ds.file_meta.TransferSyntaxUID = uid.JPEGLSLossless
    return ds


def short_native_pixel_data() -> Dataset:
    """Explicit VR Little Endian whose Pixel Data holds half of what Rows x Columns x 16 bits need."""
    ds = _fresh(examples.ct)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)
