"""Input kinds for the conversion matrix: every kind of image a modality or a PACS sends.

Each kind is a small, valid Part 10 file made here (never a shared sample:
pydicom's samples share SOP Instance UIDs between variants), with a fresh SOP
Instance UID. Native kinds are built with numpy and pydicom; encoded kinds
(tests/conversion_inputs_encoded.py) come from the tool a modality would use:
DCMTK's dcmcjpeg/dcmcjpls/dcmcrle, GDCM's gdcmconv, imagecodecs for HTJ2K.

Sizes stay small (48 × 40, multi-frame 24 × 20 × 30 frames) so that the
whole matrix runs in make test; the pixel content is a smooth ramp plus
noise, which lossy codecs compress with a sensible error, and which uses the
whole range of Bits Stored (the sign bit included for signed kinds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

ROWS, COLUMNS = 40, 48
SC = uid.SecondaryCaptureImageStorage
MF_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
MF_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
MF_COLOUR_SC = "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color SC
MF_BIT_SC = "1.2.840.10008.5.1.4.1.1.7.1"  # Multi-frame Single Bit SC
RT_DOSE = uid.RTDoseStorage
STUDY = uid.generate_uid()


def ramp(shape: tuple[int, ...], low: int, high: int, seed: int) -> np.ndarray:
    """A smooth diagonal ramp from `low` to `high` with ~1 % noise, as int64.

    Each frame's first and last pixels hold `low` and `high` themselves: the
    extremes are where codecs overflow and signed data wraps.
    """
    rows, columns = shape[-2], shape[-1]
    y, x = np.mgrid[0:rows, 0:columns]
    base = (x / max(1, columns - 1) + y / max(1, rows - 1)) / 2
    frames = shape[0] if len(shape) == 3 else 1
    shift = np.arange(frames).reshape(-1, 1, 1) / max(1, frames) * 0.2
    values = (base[None] * 0.95 + shift) % 1.0
    noise = np.random.default_rng(seed).normal(0, 0.01, (frames, rows, columns))
    scaled = low + np.clip(values + noise, 0, 1) * (high - low)
    out = np.rint(scaled).astype(np.int64)
    out[:, 0, 0], out[:, -1, -1] = low, high
    return out if len(shape) == 3 else out[0]


def base_dataset(sop_class: str, modality: str = "OT", syntax: str = uid.ExplicitVRLittleEndian) -> Dataset:
    """The modules every image IOD here needs, with a fresh SOP Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.PatientName, ds.PatientID = "Matrix^Conversion", "MATRIX01"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, uid.generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261201", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Manufacturer = "Conversion matrix"
    ds.PatientOrientation, ds.Laterality = "", ""
    ds.ContentDate, ds.ContentTime = "20261201", "120000"
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.7"):
        ds.ConversionType = "WSD"
    if sop_class in (MF_BYTE_SC, MF_WORD_SC, MF_COLOUR_SC, MF_BIT_SC):
        ds.BurnedInAnnotation = "NO"
    return ds


def pixel_module(ds: Dataset, array: np.ndarray, bits_allocated: int, bits_stored: int, signed: bool,
                 photometric: str, planar: int | None = None) -> Dataset:
    """Image Pixel module for `array` ((frames,) rows, columns(, samples)), as native bytes."""
    samples = array.shape[-1] if photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") else 1
    frames = array.shape[0] if array.ndim == (4 if samples > 1 else 3) else 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    ds.Rows, ds.Columns = array.shape[-3:-1] if samples > 1 else array.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if samples > 1:
        ds.PlanarConfiguration = planar or 0
        if planar == 1:
            array = np.moveaxis(array, -1, -3)
    if frames > 1 or ds.SOPClassUID in (MF_BYTE_SC, MF_WORD_SC, MF_COLOUR_SC, MF_BIT_SC, RT_DOSE):
        ds.NumberOfFrames = frames
        if ds.SOPClassUID != RT_DOSE:
            ds.FrameIncrementPointer = 0x00181063  # Frame Time
            ds.FrameTime = 40
    if bits_allocated == 1:
        data = np.packbits(array.astype(np.uint8).ravel(), bitorder="little").tobytes()
    else:
        dtype = f"<{'i' if signed else 'u'}{bits_allocated // 8}"
        data = array.astype(np.int64).astype(dtype).tobytes() if signed else \
            (array.astype(np.int64) & ((1 << bits_allocated) - 1)).astype(dtype).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    ds["PixelData"].VR = "OB" if bits_allocated <= 8 else "OW"
    return ds


def grey(bits_allocated: int, bits_stored: int, signed: bool, seed: int, sop_class: str = SC,
         frames: int = 0, shape: tuple[int, int] = (ROWS, COLUMNS), photometric: str = "MONOCHROME2"
         ) -> Dataset:
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else \
        (0, (1 << bits_stored) - 1)
    array = ramp((frames, *shape) if frames else shape, low, high, seed)
    ds = base_dataset(sop_class)
    if (signed and sop_class == SC) or sop_class == MF_WORD_SC:
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    if sop_class == MF_WORD_SC:
        ds.PresentationLUTShape = "IDENTITY"
    return pixel_module(ds, array, bits_allocated, bits_stored, signed, photometric)


def colour_array(seed: int, frames: int = 0, shape: tuple[int, int] = (ROWS, COLUMNS)) -> np.ndarray:
    """Three different smooth 8-bit planes: a real colour picture, not grey in disguise."""
    planes = [ramp((frames, *shape) if frames else shape, 0, 255, seed + n) for n in range(3)]
    planes[1] = 255 - planes[1]
    planes[2] = (planes[2] // 2 + 60) % 256
    return np.stack(planes, axis=-1)


def rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    """PS3.3 C.7.6.3.1.2 YBR_FULL from RGB (8-bit), rounded and clipped."""
    r, g, b = (rgb[..., n].astype(np.float64) for n in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.1687 * r - 0.3313 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.4187 * g - 0.0813 * b + 128
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.int64)


def colour(photometric: str, planar: int, seed: int, frames: int = 0) -> Dataset:
    array = colour_array(seed, frames)
    if photometric.startswith("YBR"):
        array = rgb_to_ybr_full(array)
    ds = pixel_module(base_dataset(MF_COLOUR_SC if frames else SC), array, 8, 8, False, photometric, planar)
    if photometric == "YBR_FULL_422":
        # Native 4:2:2 (PS3.3 C.7.6.3.1.2): each horizontal pixel pair is Y1 Y2 Cb Cr,
        # the pair sharing the first pixel's chroma: two bytes a pixel.
        pairs = array.reshape(*array.shape[:-2], COLUMNS // 2, 2, 3)
        packed = np.concatenate([pairs[..., 0, :1], pairs[..., 1, :1], pairs[..., 0, 1:]], axis=-1)
        ds.PixelData = packed.astype(np.uint8).tobytes()
    return ds


def palette(entry_bits: int, seed: int) -> Dataset:
    """PALETTE COLOR: 8-bit indices and three 256-entry LUTs of 8- or 16-bit entries."""
    indices = ramp((ROWS, COLUMNS), 0, 255, seed)
    ds = pixel_module(base_dataset(SC), indices, 8, 8, False, "PALETTE COLOR")
    top = (1 << entry_bits) - 1
    # A gamma curve, not a straight line: a straight 16-bit ramp is k × 257, whose two
    # bytes are equal, and would hide a LUT whose bytes were never swapped.
    ramp_lut = top * np.linspace(0, 1, 256) ** 0.6
    for name, lut in (("Red", ramp_lut), ("Green", top - ramp_lut), ("Blue", (ramp_lut * 3) % (top + 1))):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, entry_bits])
        # 8-bit entries are packed two to a 16-bit word (OW), as dciodvfy and DCMTK read them.
        data = np.rint(lut).astype("<u2" if entry_bits == 16 else "u1").tobytes()
        setattr(ds, f"{name}PaletteColorLookupTableData", data)
        ds[f"{name}PaletteColorLookupTableData"].VR = "OW"
    return ds


def bitmap(seed: int) -> Dataset:
    """1-bit (Bits Allocated 1): a Multi-frame Single Bit SC, as a scanned document is."""
    frames = ramp((2, ROWS, COLUMNS), 0, 1, seed)
    ds = pixel_module(base_dataset(MF_BIT_SC), frames, 1, 1, False, "MONOCHROME2")
    return ds


def dose(float_grid: bool, seed: int) -> Dataset:
    """An RT Dose grid: 32-bit unsigned integers with a scaling, or float32 Float Pixel Data."""
    ds = base_dataset(RT_DOSE, modality="RTDOSE")
    frames = 6
    grid = ramp((frames, 20, 24), 0, 4_000_000, seed)
    ds.OperatorsName = ""
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [2, 2], ""
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uid.generate_uid(), ""
    ds.GridFrameOffsetVector = [float(n * 2) for n in range(frames)]
    ds.FrameIncrementPointer = 0x3004000C
    if float_grid:
        values = (grid / 1e5).astype("<f4")
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns, ds.NumberOfFrames = 20, 24, frames
        ds.BitsAllocated = 32
        ds.FloatPixelData = values.tobytes()
        return ds
    ds.DoseGridScaling = 1e-5
    return pixel_module(ds, grid, 32, 32, False, "MONOCHROME2")


def with_syntax(ds: Dataset, syntax: str) -> Dataset:
    """The same object to be written in another uncompressed syntax (pydicom swaps Big Endian)."""
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Part 10 in the dataset's transfer syntax (pydicom 3 deflates Deflated itself)."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax == uid.ExplicitVRBigEndian:
        _write_big_endian(ds, path)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def _write_big_endian(ds: Dataset, path: Path) -> None:
    """pydicom writes Big Endian element values itself; OW/OL/OF bytes must be swapped by us."""
    for element in ds.iterall():
        width = {"OW": 2, "OL": 4, "OF": 4, "OD": 8}.get(element.VR)
        if element.tag == 0x7FE00010 and width:
            width = max(2, int(ds.BitsAllocated) // 8)
        if width and isinstance(element.value, bytes):
            element.value = np.frombuffer(element.value, f"<u{width}").astype(f">u{width}").tobytes()
    ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)


NATIVE: dict[str, Callable[[], Dataset]] = {
    "u8": lambda: grey(8, 8, False, 1),
    "s8": lambda: grey(8, 8, True, 2),
    "u12": lambda: grey(16, 12, False, 3),
    "s12": lambda: grey(16, 12, True, 4),
    "u16": lambda: grey(16, 16, False, 5),
    "s16": lambda: grey(16, 16, True, 6),
    "mono1_u12": lambda: grey(16, 12, False, 27, photometric="MONOCHROME1"),  # white is 0: CR, DX
    "u32": lambda: grey(32, 32, False, 7),
    "s32": lambda: grey(32, 32, True, 8),
    "bitmap": lambda: bitmap(9),
    "rgb_planar0": lambda: colour("RGB", 0, 10),
    "rgb_planar1": lambda: colour("RGB", 1, 11),
    "ybr_full": lambda: colour("YBR_FULL", 0, 12),
    "ybr_full_422": lambda: colour("YBR_FULL_422", 0, 13),
    "palette_lut8": lambda: palette(8, 14),
    "palette_lut16": lambda: palette(16, 15),
    "multiframe_u12": lambda: grey(16, 12, False, 16, MF_WORD_SC, frames=30, shape=(20, 24)),
    "multiframe_rgb": lambda: colour("RGB", 0, 17, frames=20),
    "dose_int": lambda: dose(False, 18),
    "dose_float": lambda: dose(True, 19),
    "implicit_u12": lambda: with_syntax(grey(16, 12, False, 20), uid.ImplicitVRLittleEndian),
    "bigendian_u12": lambda: with_syntax(grey(16, 12, False, 21), uid.ExplicitVRBigEndian),
    "bigendian_s16": lambda: with_syntax(grey(16, 16, True, 22), uid.ExplicitVRBigEndian),
    "bigendian_palette": lambda: with_syntax(palette(16, 23), uid.ExplicitVRBigEndian),
    "deflated_u12": lambda: with_syntax(grey(16, 12, False, 24), uid.DeflatedExplicitVRLittleEndian),
}


def s12_not_sign_extended() -> Dataset:
    """Signed 12-bit whose bits 12-15 are 0: valid (only Bits Stored bits carry the value)."""
    ds = grey(16, 12, True, 25)
    raw = np.frombuffer(ds.PixelData, "<i2") & 0x0FFF
    ds.PixelData = raw.astype("<u2").tobytes()
    return ds


def u12_high_bits_set() -> Dataset:
    """Unsigned 12-bit with bits 12-15 set (old overlay bits, or a vendor's junk)."""
    ds = grey(16, 12, False, 26)
    raw = np.frombuffer(ds.PixelData, "<u2") | 0xF000
    ds.PixelData = raw.astype("<u2").tobytes()
    return ds


NATIVE["s12_unextended"] = s12_not_sign_extended
NATIVE["u12_highbits"] = u12_high_bits_set
