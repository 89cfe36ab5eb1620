"""Is each compressed frame the stream its header says it is? Checked before any decoder runs.

Decoders are lenient by design: libjpeg-turbo "decodes" a stream with garbage
in its entropy data, OpenJPEG returns a blurred image from a truncated
JPEG 2000 codestream, and a JPEG whose frame is 64x64 in a dataset that says
160x120 decodes to 12,288 bytes where 57,600 are due. None of that may
replace an original. This module reads only the codestream headers, never
the pixels, and refuses when:

- the number of frames in the encapsulated Pixel Data differs from Number
  of Frames;
- a JPEG family frame (ISO 10918, ISO 14495) does not start with SOI, does
  not end with EOI (one trailing pad byte allowed), or its
  frame header (SOFn) is of another process than the transfer syntax names
  (a JPEG Baseline stream labelled JPEG-LS, say), or gives other dimensions
  or another number of components than Rows, Columns, Samples per Pixel;
- a JPEG 2000 / HTJ2K frame has no SOC + SIZ, its image size or component
  count disagrees with the header, or it does not end with EOC;
- an RLE frame's header (PS3.5 G.3.1) has a segment count other than
  Samples per Pixel x Bits Allocated / 8, or offsets outside the frame.

A decoder's own rejection, and a decoded size other than Rows x Columns x
samples x bits, are checked after decoding (`native.py`, `verify.py`).
"""

from __future__ import annotations

import struct

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from appliance.transcode.errors import ConversionRefused
from appliance.transcode.syntaxes import name_of

# Which frame header (SOFn marker, second byte) each JPEG family syntax may carry.
JPEG_PROCESSES: dict[str, tuple[int, ...]] = {
    uid.JPEGBaseline8Bit: (0xC0, 0xC1),  # 8-bit extended Huffman streams exist under .50 too
    uid.JPEGExtended12Bit: (0xC0, 0xC1),  # a baseline stream is a valid extended one
    uid.JPEGLossless: (0xC3,),
    uid.JPEGLosslessSV1: (0xC3,),
    uid.JPEGLSLossless: (0xF7,),
    uid.JPEGLSNearLossless: (0xF7,),
}
J2K_SYNTAXES = (uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K)
SOF_NAMES = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xF7: "JPEG-LS"}


def check_frames(ds: Dataset, syntax: str) -> None:
    """Raise ConversionRefused when an encapsulated frame disagrees with the dataset's header."""
    expected = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=expected))
    except Exception as exc:  # pydicom raises several types for broken item tags
        raise ConversionRefused(f"encapsulated Pixel Data cannot be split into frames: {exc}") from None
    if len(frames) != expected:
        raise ConversionRefused(f"encapsulated Pixel Data holds {len(frames)} frame(s), "
                                f"Number of Frames says {expected}")
    shape = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1)))
    for number, frame in enumerate(frames, 1):
        problem = _frame_problem(frame, syntax, shape, int(ds.BitsAllocated))
        if problem:
            where = f"frame {number}: " if expected > 1 else ""
            raise ConversionRefused(f"{name_of(syntax)} {where}{problem}")


def _frame_problem(frame: bytes, syntax: str, shape: tuple[int, int, int], bits_allocated: int) -> str:
    if syntax in JPEG_PROCESSES:
        return _jpeg_problem(frame, JPEG_PROCESSES[syntax], shape)
    if syntax in J2K_SYNTAXES:
        return _j2k_problem(frame, shape)
    if syntax == uid.RLELossless:
        return _rle_problem(frame, shape[2] * max(1, bits_allocated // 8))
    return ""


def _strip_padding(frame: bytes) -> bytes:
    """A frame is padded to even length; encoders pad with 0x00 (PS3.5 A.4) or 0xFF (IJG fill)."""
    return frame[:-1] if frame[-1:] in (b"\x00", b"\xff") else frame


def _jpeg_problem(frame: bytes, processes: tuple[int, ...], shape: tuple[int, int, int]) -> str:
    if not frame.startswith(b"\xff\xd8"):
        return "stream does not start with a JPEG SOI marker"
    if not _strip_padding(frame).endswith(b"\xff\xd9"):
        return "stream is truncated (no EOI marker at its end)"
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return f"no JPEG marker at byte {position} of the header"
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = struct.unpack(">H", frame[position + 2:position + 4])[0]
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if marker not in processes:
                found = SOF_NAMES.get(marker, f"SOF 0x{marker:02X}")
                return f"stream is {found} JPEG, not what the transfer syntax names"
            if position + 10 > len(frame):
                return "frame header is truncated"
            height, width = struct.unpack(">HH", frame[position + 5:position + 9])
            components = frame[position + 9]
            rows, columns, samples = shape
            if (height and height != rows) or width != columns or components != samples:
                return (f"stream is {width}x{height} with {components} component(s); the header says "
                        f"{columns}x{rows} with {samples}")
            return ""
        if marker == 0xDA:
            break
        position += 2 + length
    return "stream has no frame header (SOF) before its scan"


def _j2k_problem(frame: bytes, shape: tuple[int, int, int]) -> str:
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ; a JP2 wrapper is skipped over
    if start < 0:
        return "stream has no JPEG 2000 codestream (SOC, SIZ)"
    siz = frame[start + 4:start + 42]
    if len(siz) < 38:
        return "SIZ marker segment is truncated"
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", siz[4:20])
    components = struct.unpack(">H", siz[36:38])[0]
    rows, columns, samples = shape
    if (xsiz - xosiz, ysiz - yosiz, components) != (columns, rows, samples):
        return (f"codestream is {xsiz - xosiz}x{ysiz - yosiz} with {components} component(s); the header "
                f"says {columns}x{rows} with {samples}")
    if not _strip_padding(frame).endswith(b"\xff\xd9"):
        return "codestream is truncated (no EOC marker at its end)"
    return ""


def _rle_problem(frame: bytes, segments_due: int) -> str:
    if len(frame) < 64:
        return "frame is shorter than its 64-byte RLE header"
    header = struct.unpack("<16I", frame[:64])
    count, offsets = header[0], header[1:header[0] + 1] if header[0] <= 15 else ()
    if count != segments_due:
        return f"RLE header has {count} segment(s), {segments_due} are due for this image"
    if offsets[0] != 64 or list(offsets) != sorted(offsets) or offsets[-1] >= len(frame):
        return "RLE segment offsets point outside the frame"
    return ""


__all__ = ["check_frames"]
