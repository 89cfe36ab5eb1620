"""Second opinions on pixel data: DCMTK or GDCM, and pydicom, each decoding the same file.

A converted image is judged against what independent decoders make of the
source, never against the converter's own decoder. Each file goes through:

- the reference tool for its syntax, which writes native Explicit VR Little
  Endian that we read as raw bytes: `dcmconv +te` (uncompressed, Big
  Endian, Deflated), `dcmdjpeg` (JPEG), `dcmdjpls` (JPEG-LS), `dcmdrle`
  (RLE), `gdcmconv --raw` (JPEG 2000, which Debian's DCMTK cannot decode).
  Neither Debian's DCMTK 3.6.7 nor GDCM 3.0.21 reads HTJ2K: for it the
  second opinion is OpenJPH (imagecodecs), where pydicom uses OpenJPEG.
- pydicom's own decoders (its plugins' choice), without colour conversion.

Values are compared as the standard defines them: only the Bits Stored bits
of native data carry the value, sign-extended when Pixel Representation is
1. pydicom's arrays from compressed data are taken as it returns them: that
is what a pydicom-based viewer shows. Results are cached per pixel content,
so the same output reached by two paths is decoded once.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder

LOSSY_SYNTAXES = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000,
                  uid.HTJ2K}
JPEG = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1}
JPEG_LS = {uid.JPEGLSLossless, uid.JPEGLSNearLossless}
J2K = {uid.JPEG2000Lossless, uid.JPEG2000}
HTJ2K = {uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K}
UNCOMPRESSED = {uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian,
                uid.DeflatedExplicitVRLittleEndian}
# Spaces the samples are in once decoded: the codec inverts YBR_RCT/YBR_ICT itself.
SPACE = {"YBR_FULL_422": "YBR_FULL", "YBR_RCT": "RGB", "YBR_ICT": "RGB", "YBR_PARTIAL_420": "YBR_FULL"}


@dataclass(frozen=True)
class Decoded:
    """Pixel values as (frames, rows, columns, samples), or why the decoder refused them."""

    decoder: str
    values: np.ndarray | None
    space: str = ""  # MONOCHROME1/2, PALETTE COLOR, RGB, YBR_FULL, or FLOAT
    bits_stored: int = 0
    bits_allocated: int = 0
    error: str = ""
    signed: bool = False  # Pixel Representation 1
    colours: np.ndarray | None = None  # PALETTE COLOR: the indices through the file's own LUTs


_CACHE: dict[tuple[str, str], Decoded] = {}
_DCIODVFY: dict[str, frozenset[str]] = {}


def _read(path: Path, **kwargs) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kwargs)


def pixel_key(path: Path) -> str:
    """A digest of what decides the pixels: syntax, image pixel attributes and pixel data."""
    ds = _read(path)
    digest = hashlib.sha256(str(ds.file_meta.TransferSyntaxUID).encode())
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames"):
        digest.update(f"{keyword}={ds.get(keyword)};".encode())
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            digest.update(keyword.encode() + bytes(ds[keyword].value))
    return digest.hexdigest()


def standard_values(raw: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Only the Bits Stored bits, sign-extended for signed data (PS3.5 8.1.1)."""
    values = raw.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        values = np.where(values & (1 << (bits_stored - 1)), values - (1 << bits_stored), values)
    return values


def _shape(ds: pydicom.Dataset) -> tuple[int, int, int, int]:
    return (int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns),
            int(ds.get("SamplesPerPixel", 1)))


def native_values(ds: pydicom.Dataset, decoder: str) -> Decoded:
    """Read native little endian pixel data as raw bytes, the way the standard lays it out."""
    frames, rows, columns, samples = _shape(ds)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        single = "FloatPixelData" in ds
        keyword, dtype = ("FloatPixelData", "<f4") if single else ("DoubleFloatPixelData", "<f8")
        data = np.frombuffer(ds[keyword].value, dtype)
        if data.size != frames * rows * columns:
            return Decoded(decoder, None, error=f"{data.size} float values for {frames}x{rows}x{columns}")
        return Decoded(decoder, data.view(dtype.replace("f", "u")).reshape(frames, rows, columns, 1), "FLOAT",
                       int(dtype[-1]) * 8, int(dtype[-1]) * 8)
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    data = bytes(ds.PixelData)
    count = frames * rows * columns * samples
    if photometric == "YBR_FULL_422" and allocated == 8:
        needed = count * 2 // 3
    else:
        needed = (count * allocated + 7) // 8
    if len(data) not in (needed, needed + needed % 2):  # odd lengths get one byte of padding
        return Decoded(decoder, None, error=f"Pixel Data holds {len(data)} bytes, the header needs {needed}")
    if allocated == 1:
        raw = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count]
    elif photometric == "YBR_FULL_422" and allocated == 8:
        pairs = np.frombuffer(data[:needed], np.uint8).reshape(frames, rows, columns // 2, 4)
        y = pairs[..., :2].reshape(frames, rows, columns)
        chroma = np.repeat(pairs[..., 2:], 2, axis=2)
        raw = np.concatenate([y[..., None], chroma], axis=-1)
    else:
        raw = np.frombuffer(data[:needed], f"<u{allocated // 8}")
    values = standard_values(raw, stored, signed)
    if samples > 1 and int(ds.get("PlanarConfiguration", 0)) == 1 and photometric != "YBR_FULL_422":
        values = values.reshape(frames, samples, rows, columns).transpose(0, 2, 3, 1)
    values = values.reshape(frames, rows, columns, samples)
    return Decoded(decoder, values, SPACE.get(photometric, photometric), stored, allocated, signed=signed,
                   colours=palette_colours(ds, values))


def palette_colours(ds: pydicom.Dataset, values: np.ndarray) -> np.ndarray | None:
    """The RGB a viewer shows for PALETTE COLOR indices, through the dataset's LUTs.

    Only for little endian datasets: pydicom 3.0 reads a Big Endian file's
    LUT data as little endian (wrong colours), so a Big Endian source is
    judged by DCMTK's little endian copy of it alone.
    """
    if ds.get("PhotometricInterpretation") != "PALETTE COLOR" or not ds.original_encoding[1]:
        return None
    return apply_color_lut(values[..., 0].astype(np.uint16), ds)


def _tool_for(syntax: str) -> list[str] | None:
    if syntax in UNCOMPRESSED:
        return ["dcmconv", "+te"]
    if syntax in JPEG:
        return ["dcmdjpeg"]
    if syntax in JPEG_LS:
        return ["dcmdjpls"]
    if syntax == uid.RLELossless:
        return ["dcmdrle"]
    if syntax in J2K:
        return ["gdcmconv", "--raw"]
    return None


def reference(path: Path) -> Decoded:
    """The file as DCMTK or GDCM (OpenJPH for HTJ2K) decodes it."""
    key = ("reference", pixel_key(path))
    if key not in _CACHE:
        _CACHE[key] = _reference(path)
    return _CACHE[key]


def _reference(path: Path) -> Decoded:
    syntax = str(_read(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if syntax in HTJ2K:
        return _openjph(path)
    command = _tool_for(syntax)
    if command is None:
        return Decoded("none", None, error=f"no reference decoder for {syntax}")
    name = " ".join(command)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "decoded.dcm"
        done = subprocess.run([*command, str(path), str(out)], capture_output=True, text=True, timeout=60)
        complaint = [line for line in (done.stdout + done.stderr).splitlines()
                     if line.startswith(("E:", "F:")) or "Corrupt" in line or "rror" in line]
        if done.returncode != 0 or complaint or not out.exists():
            return Decoded(name, None, error=f"exit {done.returncode}: {' '.join(complaint)[:200]}")
        decoded = native_values(_read(out), name)
        if command[0] == "gdcmconv":  # it rewrites 16-bit palette LUTs to 8-bit precision
            decoded = replace(decoded, colours=None)
        return decoded


def _openjph(path: Path) -> Decoded:
    ds = _read(path)
    frames, rows, columns, samples = _shape(ds)
    try:
        streams = generate_frames(ds.PixelData, number_of_frames=frames)
        decoded = [imagecodecs.htj2k_decode(f) for f in streams]
        array = np.stack([d.reshape(rows, columns, samples) for d in decoded])
    except Exception as exc:  # any codec error is the decoder's refusal
        return Decoded("OpenJPH", None, error=str(exc)[:200])
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    values = standard_values(array.view(array.dtype.str.replace("i", "u")), int(ds.BitsStored), signed)
    photometric = str(ds.PhotometricInterpretation)
    return Decoded("OpenJPH", values, SPACE.get(photometric, photometric), int(ds.BitsStored),
                   int(ds.BitsAllocated), signed=signed)


def pydicom_decode(path: Path) -> Decoded:
    """The file as pydicom decodes it, in the colour space its decoder says it returned."""
    key = ("pydicom", pixel_key(path))
    if key not in _CACHE:
        _CACHE[key] = _pydicom(path)
    return _CACHE[key]


def _pydicom(path: Path) -> Decoded:
    ds = _read(path)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax in UNCOMPRESSED or "PixelData" not in ds:
        if syntax == uid.ExplicitVRBigEndian or "PixelData" not in ds:
            return _pydicom_native(ds)
        return native_values(ds, "pydicom")
    frames, rows, columns, samples = _shape(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array, meta = get_decoder(syntax).as_array(ds, as_rgb=False)
    except Exception as exc:  # every plugin failed: pydicom's refusal
        return Decoded("pydicom", None, error=str(exc).splitlines()[0][:200])
    if array.size != frames * rows * columns * samples:
        return Decoded("pydicom", None, error=f"{array.size} samples for {frames}x{rows}x{columns}x{samples}")
    photometric = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    values = array.astype(np.int64).reshape(frames, rows, columns, samples)
    return Decoded("pydicom", values, SPACE.get(photometric, photometric), int(ds.BitsStored),
                   int(ds.BitsAllocated), signed=int(ds.get("PixelRepresentation", 0)) == 1,
                   colours=palette_colours(ds, values))


def _pydicom_native(ds: pydicom.Dataset) -> Decoded:
    """Big Endian and float data through pydicom's own array (it swaps Big Endian itself)."""
    frames, rows, columns, samples = _shape(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array
    except Exception as exc:
        return Decoded("pydicom", None, error=str(exc)[:200])
    photometric = str(ds.PhotometricInterpretation)
    if array.dtype.kind == "f":
        unsigned = array.astype(array.dtype.newbyteorder("<")).view(f"<u{array.dtype.itemsize}")
        return Decoded("pydicom", unsigned.reshape(frames, rows, columns, 1), "FLOAT",
                       array.dtype.itemsize * 8, array.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    raw = array.astype(np.int64)
    values = standard_values(raw, int(ds.BitsStored), signed)
    return Decoded("pydicom", values.reshape(frames, rows, columns, samples),
                   SPACE.get(photometric, photometric), int(ds.BitsStored), int(ds.BitsAllocated),
                   signed=signed)


def as_rgb(decoded: Decoded) -> np.ndarray:
    """Values in RGB, for comparing a lossy result whose colour encoding may differ."""
    assert decoded.values is not None
    if decoded.space == "YBR_FULL":
        return convert_color_space(decoded.values.astype(np.uint8), "YBR_FULL", "RGB").astype(np.int64)
    return decoded.values


def psnr(reference_values: np.ndarray, test: np.ndarray, bits_stored: int) -> float:
    """Peak signal-to-noise ratio in dB against the full Bits Stored range."""
    error = np.mean((reference_values.astype(np.float64) - test.astype(np.float64)) ** 2)
    if error == 0:
        return float("inf")
    peak = float((1 << bits_stored) - 1)
    return float(10 * np.log10(peak * peak / error))


def difference(expected: Decoded, got: Decoded, min_psnr: float | None) -> str | None:
    """None when `got` shows the image `expected` shows; else what differs, in a user's words.

    `min_psnr` None asks for the exact values in the same colour space; a
    number allows a lossy error (colour compared in RGB) down to that PSNR.
    """
    for view in (got, expected):
        if view.values is None:
            return f"{view.decoder} refused it: {view.error}"
    if expected.values.shape != got.values.shape:
        return f"{got.decoder}: shape {got.values.shape}, expected {expected.values.shape}"
    if min_psnr is None:
        if got.space != expected.space:
            return f"{got.decoder}: samples in {got.space}, expected {expected.space}"
        wrong = int(np.count_nonzero(got.values != expected.values))
        if wrong:
            return (f"{got.decoder}: {wrong} of {got.values.size} samples differ "
                    f"(range {got.values.min()}..{got.values.max()}, "
                    f"expected {expected.values.min()}..{expected.values.max()})")
        if got.colours is not None and expected.colours is not None and (
                got.colours.shape != expected.colours.shape or np.any(got.colours != expected.colours)):
            return f"{got.decoder}: same palette indices, other colours (the LUTs changed)"
        return None
    colour = {"RGB", "YBR_FULL"}
    if (got.space in colour) != (expected.space in colour) or (
            got.space not in colour and got.space != expected.space):
        return f"{got.decoder}: colour model {got.space}, expected {expected.space}"
    quality = psnr(as_rgb(expected), as_rgb(got), expected.bits_stored)
    if quality < min_psnr:
        return f"{got.decoder}: PSNR {quality:.1f} dB, below {min_psnr} dB"
    return None


def jpeg_ls_near(path: Path) -> int | None:
    """The largest NEAR of a JPEG-LS file's scans (ISO 14495-1 C.2.3: each SOS carries it).

    Near-lossless JPEG-LS promises every sample within NEAR of the original:
    that, not a PSNR, is the bound its results are held to.
    """
    ds = _read(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    nears: list[int] = []
    for stream in generate_frames(ds.PixelData, number_of_frames=frames):
        at = stream.find(b"\xff\xda")
        while at != -1:
            components = stream[at + 4]
            nears.append(stream[at + 5 + 2 * components])
            at = stream.find(b"\xff\xda", at + 2)
    return max(nears) if nears else None


def dciodvfy_errors(path: Path) -> frozenset[str]:
    """dciodvfy's Error lines for a file, cached.

    Debian's dciodvfy reads neither Deflated files (it is given the inflated
    copy dcmconv makes: deflate wraps the same dataset) nor the HTJ2K syntaxes,
    which it predates (it is given the object relabelled JPEG 2000, which
    PS3.5 constrains the same way at the DICOM level).
    """
    key = hashlib.sha256(path.read_bytes()).hexdigest()
    if key in _DCIODVFY:
        return _DCIODVFY[key]
    syntax = str(_read(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    with tempfile.TemporaryDirectory() as scratch:
        checked = path
        if syntax == uid.DeflatedExplicitVRLittleEndian:
            checked = Path(scratch) / "inflated.dcm"
            subprocess.run(["dcmconv", "+te", str(path), str(checked)], capture_output=True, timeout=60)
        elif syntax in HTJ2K:
            checked = Path(scratch) / "as-j2k.dcm"
            ds = _read(path)
            ds.file_meta.TransferSyntaxUID = uid.JPEG2000 if syntax == uid.HTJ2K else uid.JPEG2000Lossless
            ds.save_as(checked, enforce_file_format=True)
        done = subprocess.run(["dciodvfy", str(checked)], capture_output=True, text=True, timeout=60)
    errors = frozenset(line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error"))
    _DCIODVFY[key] = errors
    return errors
