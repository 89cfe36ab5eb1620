"""Encoding native pixel data in a compressed transfer syntax (imagecodecs, pydicom's encoders).

imagecodecs (libjpeg-turbo, CharLS, OpenJPEG, OpenJPH) encodes every syntax:
one library, bit-exact where lossless, readable by DCMTK. JPEG 2000 lossy
goes through pylibjpeg-openjpeg (a compression ratio, not a PSNR target)
and RLE through pydicom's encoder. Whatever this module produces is decoded
and compared with the source before it is used (`verify.py`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset

from appliance.transcode.errors import CannotConvert
from appliance.transcode.syntaxes import name_of

if TYPE_CHECKING:
    from appliance.transcode.convert import Quality


def frames_of(ds: Dataset) -> np.ndarray:
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


def encode(native: Dataset, target: str, quality: Quality) -> tuple[list[bytes], int]:
    """The frames of `native` encoded in `target`, and the native size in bytes they stand for.

    Sets the attributes the encoding changes (Photometric Interpretation,
    Planar Configuration); the caller sets the Pixel Data and the lossy marks.
    """
    frames = frames_of(native)
    bits_stored = int(native.BitsStored)
    samples = int(native.get("SamplesPerPixel", 1))
    colour = samples == 3
    if target == uid.RLELossless:
        encoded = [_rle(native, f) for f in frames]
    elif target in (uid.JPEGBaseline8Bit,):
        if int(native.BitsAllocated) != 8 or bits_stored > 8:
            raise CannotConvert(f"JPEG Baseline holds 8-bit data, not {bits_stored}-bit")
        # One colour transform at most: YBR_FULL samples (native YBR_FULL_422 is expanded
        # to them) are YCbCr already and go in as such; RGB is transformed by the encoder.
        ybr = native.PhotometricInterpretation == "YBR_FULL"
        kwargs = ({"colorspace": "YCbCr" if ybr else "RGB", "outcolorspace": "YCbCr",
                   "subsampling": "422"} if colour else {})
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
        if near:
            # Near-lossless through pyjpegls told Bits Stored, so MAXVAL is 2^BitsStored - 1 and the
            # reconstruction is clamped there: at 16 bits a 4095 could come back as 4096, which a
            # 12-bit reader shows as 0 (imagecodecs takes the width from the data).
            encoded = [_jpeg_ls_near(native, _unsigned(f, width), near) for f in frames]
        else:
            encoded = [imagecodecs.jpegls_encode(_unsigned(f, width), level=0) for f in frames]
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
    if target == uid.JPEGBaseline8Bit and colour:
        out.PhotometricInterpretation = "YBR_FULL_422"
    elif target in (uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL,
                    uid.HTJ2K) and colour and out.PhotometricInterpretation == "RGB":
        # The codestreams carry the colour transform (PS3.5 8.2.4, 8.2.8): say so.
        reversible = target in (uid.JPEG2000Lossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL)
        out.PhotometricInterpretation = "YBR_RCT" if reversible else "YBR_ICT"
    if colour:
        out.PlanarConfiguration = 0
    return encoded, frames.size * frames.dtype.itemsize


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


def _jpeg_ls_near(native: Dataset, frame: np.ndarray, near: int) -> bytes:
    from pydicom.pixels.encoders import JPEGLSNearLosslessEncoder

    return JPEGLSNearLosslessEncoder.encode(
        np.ascontiguousarray(frame).tobytes(),
        rows=int(native.Rows), columns=int(native.Columns),
        samples_per_pixel=int(native.get("SamplesPerPixel", 1)),
        bits_allocated=int(native.BitsAllocated), bits_stored=int(native.BitsStored),
        pixel_representation=0, photometric_interpretation=str(native.PhotometricInterpretation),
        number_of_frames=1, planar_configuration=0, jls_error=near,
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


__all__ = ["encode", "frames_of"]
