"""Convert an object's pixel data to another transfer syntax; nothing else changes.

Only the pixel data is re-encoded. Every other element, private tags and
sequences included, is carried over from the object itself, never rebuilt
from a template. The attributes the standard ties to compression follow:

- Transfer Syntax UID; Photometric Interpretation where a codec changes it
  (JPEG baseline colour is YBR_FULL_422; decoded YBR data becomes RGB).
- Lossy compression (PS3.3 C.7.6.1.1.5): Lossy Image Compression (0028,2110)
  = "01" and never reset; Lossy Image Compression Ratio (0028,2112) and
  Method (0028,2114) get one more value per lossy step (C.7.6.1.1.5.1/.2);
  Image Type value 1 becomes DERIVED, and "if the predecessor was a DICOM
  image, then the Image shall receive a new SOP Instance UID", with the
  predecessor referenced in Source Image Sequence (purpose DCM 121320,
  "Uncompressed predecessor").
- Lossless steps and decompression keep the SOP Instance UID: the image is
  the same image (pydicom mints a new one by default: we pass
  generate_instance_uid=False everywhere).

Decoding uses pydicom's plugins (pylibjpeg, pyjpegls) with imagecodecs as the
fallback (12-bit JPEG that libjpeg refuses, NOTES.md). Encoding uses
imagecodecs for every syntax (libjpeg-turbo, CharLS, OpenJPEG, OpenJPH):
one library, bit-exact where lossless, readable by DCMTK.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import imagecodecs
import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from appliance.transcode.syntaxes import LOSSY, UNCOMPRESSED, class_of, name_of

NATIVE_LE = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian)
METHODS = {  # Lossy Image Compression Method defined terms (PS3.3 C.7.6.1.1.5.1)
    uid.JPEGBaseline8Bit: "ISO_10918_1",
    uid.JPEGExtended12Bit: "ISO_10918_1",
    uid.JPEGLSNearLossless: "ISO_14495_1",
    uid.JPEG2000: "ISO_15444_1",
    uid.HTJ2K: "ISO_15444_15",
}
SWAP_WIDTH = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


class CannotConvert(Exception):
    """This object cannot be converted to that syntax; the message says why."""


@dataclass(frozen=True)
class Conversion:
    dataset: Dataset
    source_syntax: str
    target_syntax: str
    lossy: bool  # this step lost information
    ratio: float | None  # native size / encoded size, for lossy steps


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
) -> Conversion:
    """`ds` with its pixel data in `target`: a copy, or `ds` itself when `in_place`.

    `derived_uid` is the SOP Instance UID a lossy result gets (a fresh one if
    None): the store pipeline derives it from the original so a retry makes
    the same instance. `in_place` is for a caller that read the dataset just
    for this conversion (the store pipeline): the deep copy is a third of the
    cost of a fast lossless encode.
    """
    quality = quality or Quality()
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return Conversion(ds if in_place else copy.deepcopy(ds), source, target, False, None)
    result = _convert(ds, source, target, quality, derived_uid, in_place)
    _match_encoding(result.dataset, target)
    return result


def _match_encoding(ds: Dataset, target: str) -> None:
    """Make the dataset's own encoding agree with its new transfer syntax.

    pydicom keeps the encoding a dataset was read in, and pynetdicom refuses
    to send an Explicit VR dataset as Implicit: every element is decoded
    first (so none is left to be parsed in the wrong encoding), then the
    encoding is set to the target's.
    """
    implicit = target == uid.ImplicitVRLittleEndian
    little = target != uid.ExplicitVRBigEndian
    if ds.original_encoding != (implicit, little):
        for _element in ds.iterall():
            pass
    ds.set_original_encoding(implicit, little, ds.original_character_set)


def _convert(
    ds: Dataset, source: str, target: str, quality: Quality, derived_uid: str | None, in_place: bool
) -> Conversion:
    if class_of(source) is None or class_of(target) is None:
        raise CannotConvert(f"{name_of(source)} -> {name_of(target)}: video and unknown "
                            "syntaxes are kept as they are")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise CannotConvert("float pixel data can only be sent uncompressed")
        if target in UNCOMPRESSED:  # no pixels (SR, KO, PR...): only the encoding changes
            out = _native_copy(ds, source, in_place)
            out.file_meta.TransferSyntaxUID = target
            return Conversion(out, source, target, False, None)
        raise CannotConvert("object has no pixel data to compress")
    native = _native_copy(ds, source, in_place)
    if target in UNCOMPRESSED:
        native.file_meta.TransferSyntaxUID = target
        return Conversion(native, source, target, False, None)
    try:
        return _encode(native, source, target, quality, derived_uid)
    except CannotConvert:
        raise
    except Exception as exc:  # codecs raise many types; the caller keeps the original
        raise CannotConvert(f"{name_of(target)} encoder failed: {exc}") from None


# --- decoding ---------------------------------------------------------------------


def _native_copy(ds: Dataset, source: str, in_place: bool = False) -> Dataset:
    """`ds` (or a deep copy of it) with native little endian pixel data."""
    out = ds if in_place else copy.deepcopy(ds)
    if source in NATIVE_LE:
        return out
    if source == uid.ExplicitVRBigEndian:
        _swap_to_little_endian(out)
        out.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        return out
    # pyjpegls decodes JPEG-LS ~4x faster than pylibjpeg-libjpeg, pydicom's first choice
    # (docs/PERFORMANCE.md, codecs); the default order stays the fallback.
    plugin = "pyjpegls" if source in (uid.JPEGLSLossless, uid.JPEGLSNearLossless) else ""
    try:
        try:
            out.decompress(as_rgb=True, generate_instance_uid=False, decoding_plugin=plugin)
        except Exception:
            if not plugin:
                raise
            out.decompress(as_rgb=True, generate_instance_uid=False)
    except Exception as exc:  # pydicom's plugins raise several types
        try:
            _decompress_with_imagecodecs(out)
        except Exception as fallback:
            raise CannotConvert(
                f"cannot decode {name_of(source)}: {exc}; imagecodecs: {fallback}"
            ) from None
    return out


def _decompress_with_imagecodecs(ds: Dataset) -> None:
    from pydicom.encaps import generate_frames

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    decoded = [_decode_frame(f) for f in generate_frames(ds.PixelData, number_of_frames=frames)]
    array = np.stack(decoded) if frames > 1 else decoded[0]
    if ds.BitsAllocated > 8 and array.dtype.itemsize == 1:
        array = array.astype(np.uint16)
    _set_native(ds, array)


def _decode_frame(frame: bytes) -> np.ndarray:
    for decoder in (imagecodecs.jpeg8_decode, imagecodecs.ljpeg_decode, imagecodecs.jpegls_decode,
                    imagecodecs.jpeg2k_decode, imagecodecs.htj2k_decode):
        try:
            return decoder(frame)
        except Exception:  # try the next codec
            continue
    raise ValueError("no imagecodecs decoder accepts the frame")


def _set_native(ds: Dataset, array: np.ndarray) -> None:
    ds.PixelData = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated <= 8 else "OW"
    ds["PixelData"].is_undefined_length = False
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    if ds.get("SamplesPerPixel", 1) > 1 and ds.PhotometricInterpretation.startswith("YBR"):
        ds.PhotometricInterpretation = "RGB"


def _swap_to_little_endian(ds: Dataset) -> None:
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


# --- encoding ---------------------------------------------------------------------


def _frames(ds: Dataset) -> np.ndarray:
    """Native pixels as (frames, rows, columns[, samples]) of unsigned or signed ints."""
    if ds.PhotometricInterpretation == "YBR_FULL_422":
        # Native 4:2:2 shares chroma between pixel pairs: expand it (losslessly).
        ds.pixel_array_options(as_rgb=False)
        array = ds.pixel_array
        ds.PhotometricInterpretation = "YBR_FULL"
        return array.reshape((-1, *array.shape[-3:]))
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16):
        raise CannotConvert(f"{bits}-bit pixel data can only be stored uncompressed or RLE")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    data = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * columns * samples * frames)
    if samples > 1 and int(ds.get("PlanarConfiguration", 0)) == 1:
        return data.reshape(frames, samples, rows, columns).transpose(0, 2, 3, 1)
    shape = (frames, rows, columns, samples) if samples > 1 else (frames, rows, columns)
    return data.reshape(shape)


def _unsigned(frame: np.ndarray, bits_stored: int) -> np.ndarray:
    """JPEG codes unsigned samples: signed data goes as its two's complement bit pattern.

    Values outside the Bits Stored range (a header that lies) cannot survive
    that: refuse rather than change the image.
    """
    frame = np.ascontiguousarray(frame)
    if frame.dtype.kind == "u":
        if bits_stored < frame.dtype.itemsize * 8 and int(frame.max(initial=0)) >> bits_stored:
            raise CannotConvert(f"pixel values exceed Bits Stored ({bits_stored})")
        return frame
    low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    if int(frame.min(initial=0)) < low or int(frame.max(initial=0)) > high:
        raise CannotConvert(f"pixel values exceed signed Bits Stored ({bits_stored})")
    unsigned = frame.dtype.str.replace("i", "u")
    return frame.view(unsigned) & np.array((1 << bits_stored) - 1, dtype=unsigned)


def _encode(
    native: Dataset, source: str, target: str, quality: Quality, derived_uid: str | None = None
) -> Conversion:
    frames = _frames(native)
    bits_stored = int(native.BitsStored)
    samples = int(native.get("SamplesPerPixel", 1))
    colour = samples == 3
    if target == uid.RLELossless:
        encoded = [_rle(native, f) for f in frames]
    elif target in (uid.JPEGBaseline8Bit,):
        if int(native.BitsAllocated) != 8 or bits_stored > 8:
            raise CannotConvert(f"JPEG Baseline holds 8-bit data, not {bits_stored}-bit")
        kwargs = {"outcolorspace": "YCbCr", "subsampling": "422"} if colour else {}
        encoded = [imagecodecs.jpeg8_encode(_unsigned(f, 8), level=quality.level, **kwargs)
                   for f in frames]
    elif target == uid.JPEGExtended12Bit:
        if bits_stored > 12:
            raise CannotConvert(f"JPEG Extended holds up to 12-bit data, not {bits_stored}-bit")
        if colour:
            raise CannotConvert("JPEG Extended 12-bit is for greyscale images")
        encoded = [imagecodecs.jpeg8_encode(_unsigned(f, bits_stored), level=quality.level,
                                            bitspersample=12 if bits_stored > 8 else 8)
                   for f in frames]
    elif target in (uid.JPEGLossless, uid.JPEGLosslessSV1):
        if native.PhotometricInterpretation == "YBR_FULL":
            raise CannotConvert("JPEG Lossless decoders turn YBR_FULL samples into RGB: "
                                "not bit-exact, kept as received")
        # Components go as they are (no colour transform): lossless means the
        # samples of the Photometric Interpretation, whatever it is.
        kwargs = {"colorspace": "RGB", "outcolorspace": "RGB"} if colour else {}
        encoded = [imagecodecs.jpeg8_encode(_unsigned(f, bits_stored), lossless=True, predictor=1,
                                            bitspersample=bits_stored, **kwargs)
                   for f in frames]
    elif target in (uid.JPEGLSLossless, uid.JPEGLSNearLossless):
        near = 0 if target == uid.JPEGLSLossless else quality.jpeg_ls_near()
        # Signed data with Bits Stored < Bits Allocated goes at full width, sign
        # extended: pydicom's JPEG-LS decoder does not sign-extend narrower
        # samples, and every decoder reads the full-width stream right.
        width = frames.dtype.itemsize * 8 if frames.dtype.kind == "i" else bits_stored
        encoded = [imagecodecs.jpegls_encode(_unsigned(f, width), level=near) for f in frames]
    elif target == uid.JPEG2000Lossless:
        # Colour goes through the reversible colour transform (PS3.5 8.2.4: YBR_RCT).
        encoded = [imagecodecs.jpeg2k_encode(np.ascontiguousarray(f), level=0, codecformat="J2K",
                                             reversible=True, bitspersample=bits_stored,
                                             mct=colour and native.PhotometricInterpretation == "RGB")
                   for f in frames]
    elif target == uid.JPEG2000:
        encoded = [_j2k_lossy(native, f, quality) for f in frames]
    elif target in (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K):
        lossless = target != uid.HTJ2K
        rpcl: dict[str, object] = {}
        if target == uid.HTJ2KLosslessRPCL:
            # PS3.5 10.18: RPCL (OpenJPH's default), TLM markers, lowest resolution <= 64
            # pixels (imagecodecs' `resolutions` is the number of decompositions).
            longest = max(int(native.Rows), int(native.Columns))
            rpcl = {"tlm": True, "resolutions": max(5, math.ceil(math.log2(max(longest, 64) / 64)))}
        encoded = [imagecodecs.htj2k_encode(np.ascontiguousarray(f), reversible=lossless,
                                            level=None if lossless else quality.htj2k_qstep(),
                                            **rpcl)
                   for f in frames]
    else:
        raise CannotConvert(f"no encoder for {name_of(target)}")
    out = native
    out.PixelData = encapsulate(encoded, has_bot=len(encoded) > 1)
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    out.file_meta.TransferSyntaxUID = target
    if target == uid.JPEGBaseline8Bit and colour:
        out.PhotometricInterpretation = "YBR_FULL_422"
    elif target in (uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL,
                    uid.HTJ2K) and colour and out.PhotometricInterpretation == "RGB":
        # The codestreams carry the colour transform (PS3.5 8.2.4, 8.2.8): say so.
        reversible = target in (uid.JPEG2000Lossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL)
        out.PhotometricInterpretation = "YBR_RCT" if reversible else "YBR_ICT"
    if colour:
        out.PlanarConfiguration = 0
    lossy = target in LOSSY
    ratio = None
    if lossy:
        native_size = frames.size * frames.dtype.itemsize
        ratio = native_size / max(1, sum(len(f) for f in encoded))
        _mark_lossy(out, target, ratio, derived_uid)
    return Conversion(out, source, target, lossy, ratio)


def _j2k_lossy(native: Dataset, frame: np.ndarray, quality: Quality) -> bytes:
    """JPEG 2000 at a compression ratio, through pylibjpeg-openjpeg (imagecodecs' OpenJPEG
    binding only takes a PSNR target, which means little for 12-bit CT)."""
    from pydicom.pixels.encoders import JPEG2000Encoder

    if min(int(native.Rows), int(native.Columns)) < 64:
        # Too small for OpenJPEG's default resolution levels: one level, PSNR target.
        return imagecodecs.jpeg2k_encode(np.ascontiguousarray(frame), level=60, codecformat="J2K",
                                         reversible=False, resolutions=1,
                                         mct=native.PhotometricInterpretation == "RGB",
                                         bitspersample=int(native.BitsStored))
    return JPEG2000Encoder.encode(
        np.ascontiguousarray(frame).tobytes(),
        rows=int(native.Rows), columns=int(native.Columns),
        samples_per_pixel=int(native.get("SamplesPerPixel", 1)),
        bits_allocated=int(native.BitsAllocated), bits_stored=int(native.BitsStored),
        pixel_representation=int(native.get("PixelRepresentation", 0)),
        # pydicom applies the colour transform only when told the input is YBR_ICT;
        # OpenJPEG counts the ratio against Bits Stored, the promise is per stored byte.
        photometric_interpretation=("YBR_ICT" if native.PhotometricInterpretation == "RGB"
                                    else str(native.PhotometricInterpretation)),
        number_of_frames=1, planar_configuration=0,
        j2k_cr=[quality.j2k_ratio() * int(native.BitsStored) / int(native.BitsAllocated)],
        use_mct=True,
    )


def _rle(native: Dataset, frame: np.ndarray) -> bytes:
    """RLE Lossless through pydicom's own encoder (pylibjpeg-rle when installed)."""
    from pydicom.pixels.encoders import RLELosslessEncoder

    return RLELosslessEncoder.encode(
        frame.tobytes(),
        rows=int(native.Rows), columns=int(native.Columns),
        samples_per_pixel=int(native.get("SamplesPerPixel", 1)),
        bits_allocated=int(native.BitsAllocated), bits_stored=int(native.BitsStored),
        pixel_representation=int(native.get("PixelRepresentation", 0)),
        photometric_interpretation=str(native.PhotometricInterpretation),
        number_of_frames=1, planar_configuration=0,
    )


def _mark_lossy(ds: Dataset, target: str, ratio: float, derived_uid: str | None = None) -> None:
    """PS3.3 C.7.6.1.1.5: flag, ratio and method; DERIVED; a new SOP Instance UID."""
    ratios = [str(v) for v in _values(ds.get("LossyImageCompressionRatio"))]
    methods = [str(v) for v in _values(ds.get("LossyImageCompressionMethod"))]
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"[:16]]
    ds.LossyImageCompressionMethod = [*methods, METHODS[target]]
    image_type = list(_values(ds.get("ImageType"))) or ["DERIVED", "PRIMARY"]
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


def _values(value: object) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


__all__ = ["CannotConvert", "Conversion", "Quality", "convert"]
