"""The check every conversion passes before its result may stand in for the original.

`PixelCheck` takes the source's stored values before the conversion touches
them, then judges the result by decoding it again with pydicom:

- lossless targets (uncompressed, RLE, JPEG Lossless, JPEG-LS, JPEG 2000 and
  HTJ2K lossless) must give back exactly the stored values: same Rows,
  Columns, frames, samples, Bits Allocated, Bits Stored, Pixel
  Representation, every value equal. The Photometric Interpretation may
  change only where the samples do not: native YBR_FULL_422 written as the
  YBR_FULL samples it expands to, and RGB coded with JPEG 2000's reversible
  transform (YBR_RCT, which decoders undo to the same RGB).
- lossy targets must keep the colour model (grey stays the same grey,
  colour stays colour), hold values within Bits Stored, be off by no more
  than NEAR in any sample for JPEG-LS near-lossless (ISO 14495-1's promise)
  and, for greyscale, by no more than a quarter of the Bits Stored range (a codec
  blurs, it never turns black into white: the PSNR averages one such pixel
  away), and their PSNR against the source, over the full Bits Stored
  range, must reach [storage] lossy_min_psnr.

"Stored values" are those the standard defines: the low Bits Stored bits
of each sample, sign-extended when Pixel Representation is 1 (pydicom reads
native data so). A source whose container holds other bits above Bits
Stored (unsigned data with bits 12-15 set, signed data not sign-extended)
is only ever copied as it is: no codec can keep those bits and say the same
values, so such objects are kept as received rather than re-interpreted.

The result is decoded by pydicom's plugins, except lossy JPEG results
(libjpeg-turbo, see FAST_LOSSY_JPEG). A compressed source is decoded by
pydicom's plugins and, as a second opinion, by imagecodecs (libjpeg-turbo, CharLS, OpenJPEG, OpenJPH) or, for
RLE, by pydicom's own RLE decoder: two decoders that disagree mean the
stream cannot be trusted (exactly, for lossless streams; within
SECOND_OPINION_PSNR for lossy JPEG, whose decoders round differently).
"""

from __future__ import annotations

import warnings
from functools import partial

import imagecodecs
import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import convert_color_space, get_decoder

from appliance.transcode.errors import CannotConvert, ConversionRefused, one_line
from appliance.transcode.native import NATIVE_LE
from appliance.transcode.syntaxes import LOSSY, name_of

DEFAULT_MIN_PSNR = 28.0  # [storage] lossy_min_psnr; docs/DESIGN.md says why
# Two JPEG decoders (IJG libjpeg 9 in pylibjpeg, libjpeg-turbo in imagecodecs) differ by their
# IDCT and chroma upsampling: measured over 50 dB apart on clean streams, far below on garbage.
SECOND_OPINION_PSNR = 45.0
HEADER = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation")
# Lossy JPEG results are decoded by libjpeg-turbo (the colour space taken from the header, as a
# viewer does): pydicom's only 8-bit JPEG decoder (IJG libjpeg 9) and its numpy YCbCr->RGB cost
# 10-20 times the encode (docs/PERFORMANCE.md), and any correct decoder serves a PSNR bound.
FAST_LOSSY_JPEG = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit)
# Photometric changes that keep every sample (see the module docstring).
SAME_SAMPLES = {("YBR_FULL_422", "YBR_FULL"), ("RGB", "YBR_RCT")}
COLOUR_MODELS = {"RGB": "colour", "YBR_FULL": "colour", "YBR_FULL_422": "colour", "YBR_RCT": "colour",
                 "YBR_ICT": "colour", "YBR_PARTIAL_420": "colour"}
# Index-valued or bitmap data: a lossy codec would change which entry a pixel points to.
INDEX_VALUED_PHOTOMETRICS = ("PALETTE COLOR",)
SEGMENTATION_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def psnr(reference: np.ndarray, test: np.ndarray, bits_stored: int) -> float:
    """Peak signal-to-noise ratio in dB against the full Bits Stored range."""
    difference = (reference.astype(np.float64) - test).ravel()
    error = float(np.dot(difference, difference)) / max(1, difference.size)  # BLAS: 5x np.mean(d**2)
    if error == 0:
        return float("inf")
    peak = float((1 << bits_stored) - 1)
    return float(10 * np.log10(peak * peak / error))


# Codecs that code unsigned samples only: signed data goes as its two's complement bit pattern,
# where -1 and 0 are 65535 and 0 apart and the sign boundary (-2048 | 2047 for 12 bits, a common
# CT padding value) sits mid-range: a lossy step there turns black into white.
UNSIGNED_LOSSY = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless)


def refuse_lossy_for(ds: Dataset, target: str) -> None:
    """Images a lossy codec would not just blur but change (CannotConvert says why)."""
    if target in UNSIGNED_LOSSY and int(ds.get("PixelRepresentation", 0)) == 1:
        raise CannotConvert(f"{name_of(target)} codes unsigned samples: signed data would wrap at its "
                            "sign boundary in a lossy step")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric in INDEX_VALUED_PHOTOMETRICS:
        raise CannotConvert(f"{photometric} pixels are palette indices: never lossy-compressed")
    if int(ds.get("BitsAllocated", 8)) == 1 or str(ds.get("SOPClassUID", "")) in SEGMENTATION_CLASSES:
        raise CannotConvert("bitmap or segmentation labels: never lossy-compressed")


def _decoded(ds: Dataset, syntax: str, as_rgb: bool = False, plugin: str = "") -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings are about the header; the values decide
        array, _meta = get_decoder(syntax).as_array(ds, as_rgb=as_rgb, decoding_plugin=plugin)
    return array


def _header(ds: Dataset) -> dict[str, int]:
    values = {key: int(ds.get(key, 1 if key == "SamplesPerPixel" else 0) or 0) for key in HEADER}
    values["NumberOfFrames"] = int(ds.get("NumberOfFrames", 1) or 1)
    return values


class PixelCheck:
    """The source's values, taken before the conversion, and the judgement of a result."""

    def __init__(self, ds: Dataset, source: str, target: str, second_opinion: bool = True) -> None:
        missing = [key for key in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
                   if not ds.get(key)]
        if missing:
            raise ConversionRefused(f"Pixel Data without {', '.join(missing)} in the header")
        self.source = source
        self.header = _header(ds)
        self.photometric = str(ds.get("PhotometricInterpretation", ""))
        self.stored_photometric = self.photometric  # the stream's, before a decoder changes it
        self.second_opinion = second_opinion
        self.reference: np.ndarray | None = None
        self.encapsulated = uid.UID(source).is_encapsulated
        self.stream = ds.PixelData if self.encapsulated else b""
        # Little endian to little endian (Explicit, Implicit, Deflated): the Pixel Data bytes are
        # carried over untouched, so the check is their length and their identity, not a decode.
        self.copied = source in NATIVE_LE and target in NATIVE_LE
        if self.copied:
            self.container_problem = ""
            expected = _native_length(self.header)
            if self.photometric == "YBR_FULL_422":  # two samples per pixel in native form (C.7.6.3.1.2)
                expected = expected * 2 // 3
            if len(ds.PixelData) < expected:  # excess padding is carried over as it came
                raise ConversionRefused(f"Pixel Data holds {len(ds.PixelData)} bytes, Rows x Columns x "
                                        f"samples x bits x frames need {expected}")
            self.stream = ds.PixelData
        elif not self.encapsulated:
            try:
                self.reference = _decoded(ds, source)
            except Exception as exc:  # pydicom: ValueError and friends for a header that lies
                raise ConversionRefused(f"Pixel Data does not match its header: {one_line(exc)}") from None
            self.container_problem = _container_problem(ds, source)
        else:
            self.container_problem = ""

    def decoded(self, native: Dataset) -> None:
        """A compressed source was decoded into `native`: its values, confirmed by a second decoder."""
        if not self.encapsulated:
            return
        try:
            self.reference = _decoded(native, str(native.file_meta.TransferSyntaxUID))
        except Exception as exc:
            reason = (f"{name_of(self.source)} decodes to {len(native.PixelData)} bytes, not what "
                      f"Rows x Columns x samples x bits need: {one_line(exc)}")
            raise ConversionRefused(reason) from None
        self.photometric = str(native.get("PhotometricInterpretation", ""))
        problem = _container_problem(native, str(native.file_meta.TransferSyntaxUID))
        if problem:
            # pydicom hands back a JPEG-LS stream's 12-bit codes of signed data unextended where
            # DCMTK sign-extends them: the stream reads as two different images.
            raise ConversionRefused(f"{name_of(self.source)} decodes to {problem}: decoders differ on "
                                    "such streams; kept as received")
        if self.second_opinion:
            self._second_opinion(native)

    def before_encoding(self) -> None:
        """Refuse a compressed target when the container holds bits the values do not say."""
        if self.container_problem:
            raise ConversionRefused(self.container_problem + "; kept as received, never re-interpreted")

    def judge(self, result: Dataset, target: str, min_psnr: float,
              max_error: int | None = None) -> float | None:
        """Refuse a result that is not the source; the PSNR for a lossy one (None when lossless)."""
        header = _header(result)
        if self.copied:
            same_bytes = result.PixelData is self.stream or result.PixelData == self.stream
            if header != self.header or not same_bytes:
                raise ConversionRefused(f"{name_of(target)} result does not carry the source's Pixel Data "
                                        "and header unchanged")
            return None
        assert self.reference is not None
        lossy = target in LOSSY
        fields = (*HEADER[:3], "NumberOfFrames") if lossy else (*HEADER, "NumberOfFrames")
        for key in fields:
            if header[key] != self.header[key]:
                raise ConversionRefused(f"{name_of(target)} result has {key} {header[key]}, "
                                        f"the source {self.header[key]}")
        photometric = str(result.get("PhotometricInterpretation", ""))
        plugin = "pyjpegls" if target in (uid.JPEGLSLossless, uid.JPEGLSNearLossless) else ""
        try:
            if target in FAST_LOSSY_JPEG:
                decoded = _second_decode(result.PixelData, target, result, header["NumberOfFrames"],
                                         photometric)
            else:  # JPEG-LS holds the samples as stored (no colour transform): judged as such
                in_rgb = lossy and target != uid.JPEGLSNearLossless
                decoded = _decoded(result, target, as_rgb=in_rgb, plugin=plugin)
        except Exception as exc:
            raise ConversionRefused(f"{name_of(target)} result cannot be decoded: {one_line(exc)}") from None
        if decoded.shape != self.reference.shape:
            raise ConversionRefused(f"{name_of(target)} result decodes to shape {decoded.shape}, "
                                    f"the source {self.reference.shape}")
        if not lossy:
            if photometric != self.photometric and (self.photometric, photometric) not in SAME_SAMPLES:
                raise ConversionRefused(f"{name_of(target)} result is {photometric}, the source "
                                        f"{self.photometric}")
            if not np.array_equal(decoded, self.reference):
                changed = int(np.count_nonzero(decoded != self.reference))
                raise ConversionRefused(f"{name_of(target)} result differs from the source in {changed} "
                                        f"of {decoded.size} samples")
            return None
        model = COLOUR_MODELS.get(photometric, photometric)
        if model != COLOUR_MODELS.get(self.photometric, self.photometric):
            raise ConversionRefused(f"{name_of(target)} result is {photometric}, the source "
                                    f"{self.photometric}: another colour model")
        bits = self.header["BitsStored"] or 8
        signed = self.header["PixelRepresentation"] == 1
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if decoded.size and (int(decoded.min()) < low or int(decoded.max()) > high):
            raise ConversionRefused(f"{name_of(target)} result holds values outside Bits Stored ({bits}): "
                                    f"{int(decoded.min())}..{int(decoded.max())}")
        reference = self.reference if target == uid.JPEGLSNearLossless else self._as_rgb()
        # Colour is exempt from the quarter-range rule: 4:2:2 chroma at a sharp coloured edge
        # (burnt-in text) legitimately moves one channel further.
        grey = self.header["SamplesPerPixel"] == 1
        limit = max_error if max_error is not None else (1 << bits) // 4 if grey else None
        if limit is not None and decoded.size:
            wide = np.int64 if bits > 16 else np.int32
            worst = int(np.max(np.abs(reference.astype(wide) - decoded.astype(wide))))
            if worst > limit:
                raise ConversionRefused(f"{name_of(target)} result is {worst} off the source in a "
                                        f"sample (at most {limit} allowed): a codec blurs, it never inverts")
        quality = psnr(reference, decoded, bits)
        if quality < min_psnr:
            raise ConversionRefused(f"{name_of(target)} result is {quality:.1f} dB PSNR from the source, "
                                    f"under the {min_psnr:g} dB bound ([storage] lossy_min_psnr)")
        return quality

    def _as_rgb(self) -> np.ndarray:
        assert self.reference is not None
        if self.photometric in ("YBR_FULL", "YBR_FULL_422"):  # native 422 was read expanded
            return convert_color_space(self.reference, "YBR_FULL", "RGB")
        return self.reference

    def _second_opinion(self, native: Dataset) -> None:
        assert self.reference is not None
        frames = int(native.get("NumberOfFrames", 1) or 1)
        try:
            other = _second_decode(self.stream, self.source, native, frames, self.stored_photometric)
        except Exception as exc:  # a stream the second decoder rejects is not one to trust
            raise ConversionRefused(f"{name_of(self.source)} stream rejected by the second decoder "
                                    f"(the first accepted it): {one_line(exc)}") from None
        if other is None:
            return
        if other.shape != self.reference.shape:
            raise ConversionRefused(f"{name_of(self.source)} decoders disagree on the image size: "
                                    f"{self.reference.shape} and {other.shape}")
        bits = self.header["BitsStored"] or 8
        if self.source in LOSSY:
            agreement = psnr(self.reference, other, bits)
            if agreement < SECOND_OPINION_PSNR:
                raise ConversionRefused(f"{name_of(self.source)} decoders disagree ({agreement:.1f} dB "
                                        "apart): the stream is damaged")
            return
        mask = (1 << bits) - 1  # decoders differ on sign extension, never on the stored bits
        wide = np.int64 if bits > 16 else np.int32
        if not np.array_equal(self.reference.astype(wide) & mask, other.astype(wide) & mask):
            raise ConversionRefused(f"{name_of(self.source)} decoders disagree on the pixel values: "
                                    "the stream is damaged or mislabelled")


def _second_decode(stream: bytes, source: str, native: Dataset, frames: int,
                   photometric: str) -> np.ndarray | None:
    """The same stream through an independent decoder, shaped as pydicom shapes it; None if none."""
    if source == uid.RLELossless:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid.RLELossless
        for key in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
                    "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation"):
            if key in native:
                setattr(ds, key, native[key].value)
        ds.PlanarConfiguration = 1
        ds.PixelData = stream
        return _decoded(ds, uid.RLELossless, plugin="pydicom")
    if source in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
        # The header is the authority on the stream's colour space: libjpeg-turbo guesses
        # YCbCr for three components unless told, where libjpeg 9 reads R,G,B component ids.
        colour = int(native.get("SamplesPerPixel", 1)) == 3
        space = {"colorspace": "YCbCr" if photometric != "RGB" or not colour else "RGB",
                 "outcolorspace": "RGB"} if colour else {}
        decoder = partial(imagecodecs.jpeg8_decode, **space)
    else:
        decoder = {
            uid.JPEGLossless: imagecodecs.ljpeg_decode, uid.JPEGLosslessSV1: imagecodecs.ljpeg_decode,
            uid.JPEGLSLossless: imagecodecs.jpegls_decode, uid.JPEGLSNearLossless: imagecodecs.jpegls_decode,
            uid.JPEG2000Lossless: imagecodecs.jpeg2k_decode, uid.JPEG2000: imagecodecs.jpeg2k_decode,
            uid.HTJ2KLossless: imagecodecs.htj2k_decode, uid.HTJ2KLosslessRPCL: imagecodecs.htj2k_decode,
            uid.HTJ2K: imagecodecs.htj2k_decode,
        }.get(source)
    if decoder is None:
        return None
    decoded = [decoder(frame) for frame in generate_frames(stream, number_of_frames=frames)]
    array = np.stack(decoded) if frames > 1 else decoded[0]
    return array


def _native_length(header: dict[str, int]) -> int:
    bits = header["Rows"] * header["Columns"] * header["SamplesPerPixel"] * header["BitsAllocated"]
    return (bits * header["NumberOfFrames"] + 7) // 8


def _container_problem(ds: Dataset, source: str) -> str:
    """Bits above Bits Stored that the stored values do not show, or '' when there are none."""
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if allocated not in (8, 16, 32) or not 0 < stored < allocated:
        return ""
    order = ">" if source == uid.ExplicitVRBigEndian else "<"
    width = allocated // 8
    raw = np.frombuffer(ds.PixelData, dtype=f"{order}u{width}", count=len(ds.PixelData) // width)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        if np.any(raw >> stored):
            return f"unsigned data has bits set above Bits Stored ({stored})"
        return ""
    # Sign-extended: the bits from the sign bit up are all 0 or all 1.
    top = raw >> (stored - 1)
    if not np.all((top == 0) | (top == (1 << (allocated - stored + 1)) - 1)):
        return f"signed data is not sign-extended above Bits Stored ({stored})"
    return ""


__all__ = ["DEFAULT_MIN_PSNR", "PixelCheck", "psnr", "refuse_lossy_for"]
