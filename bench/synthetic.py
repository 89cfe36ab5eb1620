"""Synthetic CT series for benchmarks: realistic headers, plausible pixels, cached on disk.

Benchmarks need many real-sized objects that every peer (DCMTK, Orthanc, the
appliance) accepts as ordinary CT, and that later transcoding benchmarks can
compress like real slices. So the pixels are a body phantom (soft tissue,
lungs, a bone ring, a table) with noise and slice-to-slice variation: random
enough that no two images are equal, smooth enough to compress roughly like
a clinical CT (about 2-3:1 lossless) rather than like white noise or zeros.

Headers carry the CT Image IOD's required attributes and the ones a gateway
indexes (patient, study, series, accession, station), spread over a few
patients, studies and series so the index sees a realistic mix of inserts
and updates.

Generation is deterministic for a given (count, seed) and the files are
cached with a manifest, so a rerun of a benchmark does not spend 10 s making
the same 500 MB again.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

# Bump when the generated content changes, so stale caches are rebuilt.
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CTSpec:
    """What to generate; the manifest stores it so a cache is reused only when it matches."""

    count: int = 1000
    rows: int = 512
    columns: int = 512
    bits_stored: int = 12
    patients: int = 2
    studies_per_patient: int = 2
    series_per_study: int = 2
    noise_hu: float = 12.0
    seed: int = 20240601
    version: int = GENERATOR_VERSION

    @property
    def series_count(self) -> int:
        return self.patients * self.studies_per_patient * self.series_per_study


@dataclass(frozen=True)
class SeriesPlan:
    """Where one image sits in the patient/study/series hierarchy."""

    patient: int
    study: int
    series: int
    instance_number: int


def _uid(spec: CTSpec, *parts: object) -> str:
    """A UID that is the same on every run for the same spec, unique across parts."""
    return generate_uid(entropy_srcs=["gateway-bench-ct", str(spec.seed), *map(str, parts)])


def plan(spec: CTSpec) -> Iterator[SeriesPlan]:
    """Spread `count` images over the series, in order: whole series one after another."""
    per_series = math.ceil(spec.count / spec.series_count)
    for index in range(spec.count):
        series_index, position = divmod(index, per_series)
        patient, rest = divmod(series_index, spec.studies_per_patient * spec.series_per_study)
        study, series = divmod(rest, spec.series_per_study)
        yield SeriesPlan(patient, study, series, position + 1)


class Phantom:
    """A body-shaped CT phantom in Hounsfield units, varied per slice and noised."""

    def __init__(self, spec: CTSpec) -> None:
        self.spec = spec
        y, x = np.mgrid[0 : spec.rows, 0 : spec.columns].astype(np.float32)
        self.x = (x - spec.columns / 2) / (spec.columns / 2)
        self.y = (y - spec.rows / 2) / (spec.rows / 2)
        self.rng = np.random.default_rng(spec.seed)

    def _ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def slice_hu(self, z: float) -> np.ndarray:
        """One axial slice at relative height z (0..1): air, body, lungs, spine, ribs, table."""
        hu = np.full(self.x.shape, -1000.0, dtype=np.float32)
        body_rx, body_ry = 0.78 + 0.05 * math.sin(z * 3.1), 0.55 + 0.04 * math.cos(z * 2.3)
        body = self._ellipse(0.0, 0.05, body_rx, body_ry)
        hu[body] = 40.0 + 15.0 * self.y[body]  # soft tissue with a gentle gradient
        lung_size = max(0.05, 0.28 * math.sin(math.pi * min(max(z, 0.0), 1.0)))
        for side in (-1.0, 1.0):
            lung = self._ellipse(side * 0.33, 0.0, lung_size, lung_size * 1.35)
            hu[lung & body] = -820.0 + 60.0 * self.x[lung & body] * side
        ribs = body & ~self._ellipse(0.0, 0.05, body_rx - 0.06, body_ry - 0.06)
        hu[ribs & (np.sin(np.arctan2(self.y, self.x) * 12 + z * 20) > 0.3)] = 700.0
        hu[self._ellipse(0.0, 0.42, 0.08, 0.08)] = 900.0  # vertebral body
        hu[self._ellipse(0.0, 0.42, 0.035, 0.035)] = 300.0  # spinal canal
        hu[(self.y > 0.68) & (self.y < 0.74) & (np.abs(self.x) < 0.9)] = 200.0  # table
        noise = self.rng.normal(0.0, self.spec.noise_hu, size=hu.shape).astype(np.float32)
        hu[body] += noise[body]
        hu[~body] += noise[~body] * 0.3
        return hu

    def stored_values(self, z: float, intercept: float) -> np.ndarray:
        """Hounsfield units as unsigned stored values within BitsStored."""
        top = (1 << self.spec.bits_stored) - 1
        return np.clip(np.rint(self.slice_hu(z) - intercept), 0, top).astype("<u2")


def ct_dataset(spec: CTSpec, where: SeriesPlan, pixels: np.ndarray) -> Dataset:
    """One CT Image Storage object with the header a scanner would send."""
    p, st, se = where.patient, (where.patient, where.study), (where.patient, where.study, where.series)
    study_day = dt.date(2024, 5, 6) + dt.timedelta(days=7 * where.patient + where.study)
    date = study_day.strftime("%Y%m%d")
    sop_uid = _uid(spec, "sop", *se, where.instance_number)
    thickness = 1.25
    z = -where.instance_number * thickness

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = f"{9 + where.study:02d}1500"
    ds.SeriesTime = f"{9 + where.study:02d}{16 + where.series:02d}00"
    ds.AcquisitionTime = ds.ContentTime = f"{9 + where.study:02d}{16 + where.series:02d}30"
    ds.AccessionNumber = f"ACC{p:03d}{where.study:03d}"
    ds.Modality = "CT"
    ds.Manufacturer = "BENCH"
    ds.InstitutionName = "Gateway Bench Clinic"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = ["AXIAL 1.25 SOFT", "AXIAL 1.25 LUNG"][where.series % 2]
    ds.ManufacturerModelName = "Synthetic 512"
    ds.PatientName = f"Bench^Patient{p:02d}"
    ds.PatientID = f"BENCH{p:04d}"
    ds.PatientBirthDate = f"{1950 + 7 * p}0101"
    ds.PatientSex = "MF"[p % 2]
    ds.PatientAge = f"{study_day.year - 1950 - 7 * p:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = thickness
    ds.KVP = 120
    ds.DataCollectionDiameter = 500
    ds.ReconstructionDiameter = 360
    ds.GantryDetectorTilt = 0
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = ["STANDARD", "LUNG"][where.series % 2]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(spec, "study", *st)
    ds.SeriesInstanceUID = _uid(spec, "series", *se)
    ds.StudyID = f"{p + 1}{where.study + 1:02d}"
    ds.SeriesNumber = where.series + 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = where.instance_number
    ds.ImagePositionPatient = [-180.0, -180.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = _uid(spec, "frame", *st)
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [0.703125, 0.703125]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = [40, -600][where.series % 2]
    ds.WindowWidth = [400, 1500][where.series % 2]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def generate(spec: CTSpec, out_dir: Path) -> list[Path]:
    """Write the series of `spec` into `out_dir` (emptied first); return the file paths."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    phantom = Phantom(spec)
    per_series = math.ceil(spec.count / spec.series_count)
    paths: list[Path] = []
    for index, where in enumerate(plan(spec)):
        pixels = phantom.stored_values((where.instance_number - 1) / max(per_series - 1, 1), -1024)
        ds = ct_dataset(spec, where, pixels)
        path = out_dir / f"CT{index:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    (out_dir / MANIFEST).write_text(json.dumps(asdict(spec), indent=2) + "\n", encoding="utf-8")
    return paths


def cached(spec: CTSpec, cache_root: Path) -> list[Path]:
    """The files of `spec` under `cache_root`, generated only if missing or stale."""
    out_dir = cache_root / f"ct{spec.rows}x{spec.columns}-n{spec.count}-s{spec.seed}"
    manifest = out_dir / MANIFEST
    names = [f"CT{index:06d}.dcm" for index in range(spec.count)]
    try:
        fresh = json.loads(manifest.read_text(encoding="utf-8")) == asdict(spec)
    except (OSError, ValueError):
        fresh = False
    if fresh and all((out_dir / name).is_file() for name in names):
        return [out_dir / name for name in names]
    return generate(spec, out_dir)


# --- colour frames --------------------------------------------------------------------

RGB_GENERATOR_VERSION = 1


@dataclass(frozen=True)
class RGBSpec:
    """8-bit RGB video-capture frames: what ultrasound carts and endoscopy towers send.

    Colour objects reach a clinic gateway from frame grabbers and carts, not
    from CT: 640x480, 8 bits per sample, a black surround, burnt-in text. Even
    indices are ultrasound-like (a speckled grey sector with a colour-flow box
    and a colour bar), odd ones endoscope-like (a round pink field with smooth
    shading, vessels and specular highlights); both carry text overlays, the
    sharp edges that JPEG handles worst.
    """

    count: int = 40
    rows: int = 480
    columns: int = 640
    noise: float = 2.5
    seed: int = 20240602
    version: int = RGB_GENERATOR_VERSION


def _smooth_noise(rng: np.random.Generator, rows: int, columns: int, cell: int) -> np.ndarray:
    """Noise correlated over about `cell` pixels, unit scale: a coarse grid, bilinearly interpolated.

    Tissue texture, speckle and flow patches vary smoothly; pixel-independent
    noise alone would compress like static and square blocks like nothing real.
    """
    coarse = rng.standard_normal((rows // cell + 2, columns // cell + 2)).astype(np.float32)
    gy = np.arange(rows, dtype=np.float32) / cell
    gx = np.arange(columns, dtype=np.float32) / cell
    y0, x0 = gy.astype(int), gx.astype(int)
    fy, fx = (gy - y0)[:, None], (gx - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _draw_text(frame: np.ndarray, rng: np.random.Generator, top: int, left: int, length: int,
               colour: tuple[int, int, int], scale: int = 2) -> None:
    """Burn a line of 5x7 pseudo-glyphs into `frame`, as a cart's annotations are."""
    glyph_h, glyph_w = 7 * scale, 5 * scale
    for index in range(length):
        glyph = rng.random((7, 5)) < 0.45
        glyph = np.repeat(np.repeat(glyph, scale, axis=0), scale, axis=1)
        x = left + index * (glyph_w + scale * 2)
        region = frame[top : top + glyph_h, x : x + glyph_w]
        if region.shape[:2] != glyph.shape:
            return
        region[glyph] = colour


def _ultrasound(spec: RGBSpec, rng: np.random.Generator, phase: float) -> np.ndarray:
    rows, columns = spec.rows, spec.columns
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    apex_x, apex_y = columns / 2, 40.0
    radius = np.hypot(x - apex_x, y - apex_y)
    angle = np.arctan2(x - apex_x, y - apex_y)
    sector = (radius > 30) & (radius < rows - 50) & (np.abs(angle) < 0.7)
    tissue = 0.55 + 0.25 * np.sin(radius / 45.0 + phase) * np.cos(angle * 3.0 - phase)
    tissue -= 0.5 * (((x - apex_x - 60 * math.sin(phase)) / 55) ** 2 + ((y - 260) / 35) ** 2 < 1)  # a cyst
    tissue += 0.35 * (np.abs(radius - 330 - 10 * math.cos(phase)) < 4)  # a bright interface
    speckle = np.abs(_smooth_noise(rng, rows, columns, 2) + 1j * _smooth_noise(rng, rows, columns, 2))
    grey = np.clip(tissue * speckle * 150 * np.exp(-radius / 900), 0, 255) * sector
    frame = np.repeat(grey[..., None], 3, axis=2)
    box = (np.abs(angle) < 0.25) & (radius > 150) & (radius < 300)
    flow = _smooth_noise(rng, rows, columns, 12) * 1.5
    red, blue = box & (flow > 0.6), box & (flow < -0.6)
    frame[red] = np.stack([200 + 40 * np.tanh(flow[red]), 40 + 0 * flow[red], 30 + 0 * flow[red]], -1)
    frame[blue] = np.stack([30 + 0 * flow[blue], 60 + 0 * flow[blue], 200 - 40 * np.tanh(flow[blue])], -1)
    bar = (x > columns - 30) & (x < columns - 18) & (y > 80) & (y < 400)
    level = (400 - y[bar]) / 320
    frame[bar] = np.stack([255 * level, 128 + 0 * level, 255 * (1 - level)], -1)
    frame += rng.normal(0, spec.noise, frame.shape) * sector[..., None]
    out = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    for line in range(3):
        _draw_text(out, rng, 8 + line * 18, 8, 14 - 3 * line, (230, 230, 230))
    _draw_text(out, rng, rows - 22, columns - 170, 10, (240, 220, 60))
    return out


def _endoscope(spec: RGBSpec, rng: np.random.Generator, phase: float) -> np.ndarray:
    rows, columns = spec.rows, spec.columns
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    cx, cy = columns / 2 + 30, rows / 2
    radius = np.hypot(x - cx, y - cy)
    field = radius < rows / 2 - 12
    shade = np.clip(1.15 - (radius / (rows / 2)) ** 2 * 0.8, 0.1, 1.2)
    shade *= 0.85 + 0.15 * np.sin(x / 70 + phase) * np.cos(y / 55 - phase)
    mucosa = np.stack([205 + 20 * _smooth_noise(rng, rows, columns, 16),
                       95 + 15 * _smooth_noise(rng, rows, columns, 16),
                       85 + 10 * _smooth_noise(rng, rows, columns, 16)], -1)
    frame = mucosa * shade[..., None]
    vessels = np.abs(np.sin(x / 23 + 2 * np.sin(y / 41 + phase)) * 40 + y / 9 - 25) < 1.2
    frame[vessels] *= np.array([0.7, 0.45, 0.45], dtype=np.float32)
    for _ in range(4):
        hx, hy = rng.uniform(cx - 150, cx + 150), rng.uniform(cy - 150, cy + 150)
        spot = ((x - hx) / rng.uniform(4, 12)) ** 2 + ((y - hy) / rng.uniform(3, 8)) ** 2 < 1
        frame[spot] = 250
    frame += rng.normal(0, spec.noise, frame.shape)
    frame *= field[..., None]
    out = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    _draw_text(out, rng, 10, 10, 12, (255, 255, 255))
    _draw_text(out, rng, 30, 10, 8, (255, 255, 255))
    _draw_text(out, rng, rows - 24, 10, 16, (255, 255, 255))
    return out


def rgb_frame(spec: RGBSpec, index: int) -> np.ndarray:
    """Frame `index` of `spec` as (rows, columns, 3) uint8; the same on every run."""
    rng = np.random.default_rng([spec.seed, index])
    phase = index * 0.37
    return _ultrasound(spec, rng, phase) if index % 2 == 0 else _endoscope(spec, rng, phase)


def rgb_dataset(spec: RGBSpec, index: int, pixels: np.ndarray) -> Dataset:
    """One Secondary Capture object (digitized video) with `pixels`, Explicit VR Little Endian."""
    modality = "US" if index % 2 == 0 else "ES"
    sop_uid = generate_uid(entropy_srcs=["gateway-bench-rgb", str(spec.seed), str(index)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.ContentDate = "20240610"
    ds.StudyTime = ds.ContentTime = f"1000{index % 60:02d}"
    ds.AccessionNumber = f"RGB{index // 10:04d}"
    ds.Modality = modality
    ds.ConversionType = "DV"
    ds.Manufacturer = "BENCH"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.PatientName = "Bench^Colour"
    ds.PatientID = "BENCHRGB"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["gateway-bench-rgb", str(spec.seed), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["gateway-bench-rgb", str(spec.seed), modality])
    ds.StudyID = "1"
    ds.SeriesNumber = 1 if modality == "US" else 2
    ds.InstanceNumber = index + 1
    ds.BodyPartExamined = "ABDOMEN" if modality == "US" else "COLON"  # unpaired: no Laterality
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def rgb_datasets(spec: RGBSpec) -> list[Dataset]:
    """The frames of `spec` as datasets, in memory: 40 frames take about a second to make."""
    return [rgb_dataset(spec, index, rgb_frame(spec, index)) for index in range(spec.count)]


def read(blob: bytes) -> Dataset:
    """A dataset parsed from Part 10 bytes, as the convert service's dcmread gives it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(blob))


def part10(ds: Dataset) -> bytes:
    """`ds` as Part 10 bytes, as the convert service writes it (in memory: no disk in the figures)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
