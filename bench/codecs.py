"""Codec speed and ratio: every syntax the appliance can store, through its pipeline and directly.

    .venv/bin/python bench/codecs.py            # what `make bench` runs (2.5-3 minutes)
    .venv/bin/python bench/codecs.py --quick    # a smoke test (under a minute)

Numbers behind three choices: the default [storage]
lossless_syntax, lossy_syntax and lossy_quality (speed and ratio), whether
the appliance's pipeline costs much over the codecs it calls (target under
10 %), and whether converting before the C-STORE response would delay a
sender (the design acks as received and converts in `appliance convert`).

For each syntax of `appliance.transcode.syntaxes` LOSSLESS and LOSSY, on two
sets of images (the synthetic CT series of bench/synthetic.py: 512x512,
12 bits stored in 16; and 640x480 8-bit RGB ultrasound/endoscope frames):

- encode through the pipeline, `convert(ds, target)` on a dataset freshly
  read from its Part 10 bytes as the convert service reads it, and the same
  frame through the codec call convert.py makes, with the same arguments
  (imagecodecs, pylibjpeg-openjpeg, pylibjpeg-rle); the two codestreams must
  be identical, or the comparison would not be fair, and the table says so;
- decode through the pipeline, `convert(encoded, ExplicitVRLittleEndian)`
  (pydicom's plugins, what the appliance does to send uncompressed), and
  directly with imagecodecs (pylibjpeg-rle for RLE), the library the
  pipeline encodes with;
- ratio = native bytes / codestream bytes; lossless round trips must be
  bit-exact; lossy ones report PSNR against the full Bits Stored range
  (`appliance.commands.transcode.psnr`), median over the images.

Timing: wall clock of each call, one image at a time, pipeline and direct
back to back (in alternating order) so a slow moment hits both; rounds
outside, syntaxes inside, so a slow spell lands on one round of many
syntaxes; medians over images and rounds. The machine may be shared: the
benchmark waits for idle CPUs at the start, reads the CPU time other
processes used during each syntax's round, and measures the round again
when they kept more than DISTURBED_CPUS busy (within a budget for the run).
Every codec here is single-threaded (the CPU/wall ratio is recorded), so a
figure is what one core does; on a Raspberry Pi-class core the absolute
rates are lower (not measured here, see docs/PERFORMANCE.md).

The file shares its name with the standard library's `codecs`; run as a
script that is harmless (Python imports the standard one before bench/ joins
sys.path), but do not import it as a module from bench/.

Results: a table on stdout, progress on stderr, everything in
bench/results/codecs.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import imagecodecs
import machine
import numpy as np
import pydicom
import synthetic
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from receive import appliance_revision, machine_description

from appliance.commands.transcode import psnr
from appliance.config import StorageSettings
from appliance.transcode import syntaxes
from appliance.transcode.convert import CannotConvert, Conversion, Quality, convert

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# Other processes keeping more CPUs than this busy during a block (on average)
# may have taken this process's core: the block is measured again. The codecs
# are single-threaded, so one busy neighbour on a 2-core box leaves a core free.
DISTURBED_CPUS = 0.5
# The receive path's cost per image when receive.json is absent: docs/PERFORMANCE.md,
# appliance f121f5c, 275.4 images/s over one association.
RECEIVE_MS_DOCUMENTED = 3.63
SWEEP_QUALITIES = (95, 90, 80, 70, 50)

T = TypeVar("T")
Encoder = Callable[[np.ndarray], bytes | bytearray]
Decoder = Callable[[bytes], np.ndarray]


@dataclass
class ImageSet:
    """Images as Part 10 bytes, so every timed call starts from a fresh parse."""

    name: str
    description: str
    blobs: list[bytes]
    native_bytes: int  # pixel data bytes of one image
    bits_stored: int
    frames: list[np.ndarray] = field(default_factory=list)  # native pixels, for direct calls and PSNR


def frame_of(ds: Dataset) -> np.ndarray:
    """The single frame of a native dataset as (rows, columns[, samples]) unsigned ints."""
    dtype = np.dtype("<u1" if int(ds.BitsAllocated) == 8 else "<u2")
    rows, columns, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))
    data = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * columns * samples)
    return data.reshape((rows, columns, samples) if samples > 1 else (rows, columns))


def load_sets(ct_count: int, rgb_count: int, cache: Path) -> list[ImageSet]:
    """The CT series (cached files) and the RGB frames (made in memory), as Part 10 bytes."""
    spec = synthetic.CTSpec(count=ct_count)
    ct_blobs = [path.read_bytes() for path in synthetic.cached(spec, cache)]
    rgb_spec = synthetic.RGBSpec(count=rgb_count)
    rgb_blobs = [synthetic.part10(ds) for ds in synthetic.rgb_datasets(rgb_spec)]
    sets = [
        ImageSet("CT", f"synthetic CT, {spec.rows}x{spec.columns}, 16 bits allocated, "
                 f"{spec.bits_stored} stored, MONOCHROME2", ct_blobs, 0, spec.bits_stored),
        ImageSet("RGB", f"ultrasound/endoscope-like frames, {rgb_spec.rows}x{rgb_spec.columns} "
                 "RGB, 8 bits", rgb_blobs, 0, 8),
    ]
    for image_set in sets:
        image_set.frames = [frame_of(synthetic.read(blob)) for blob in image_set.blobs]
        image_set.native_bytes = image_set.frames[0].nbytes
    return sets


# --- the codec calls convert.py makes ----------------------------------------------


def direct_encoder(target: str, ds: Dataset, quality: Quality) -> Encoder:
    """The codec call `convert._encode` makes for `target`, same arguments, nothing around it.

    Mirrors appliance/transcode/convert.py; the benchmark checks that both
    give the same codestream, so a drift between the two shows in the table
    instead of silently measuring something else. Unsigned data only (both
    sets are): convert's `_unsigned` is then a check that returns the frame.
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    photometric = str(ds.PhotometricInterpretation)
    colour = samples == 3
    if target == uid.RLELossless:
        import rle.utils  # pylibjpeg-rle: what pydicom's RLELosslessEncoder calls

        return lambda f: rle.utils.encode_pixel_data(
            f.tobytes(), rows=rows, columns=columns, samples_per_pixel=samples,
            bits_allocated=bits_allocated, byteorder="<")
    if target == uid.JPEGBaseline8Bit:
        kwargs = {"outcolorspace": "YCbCr", "subsampling": "422"} if colour else {}
        return lambda f: imagecodecs.jpeg8_encode(f, level=quality.level, **kwargs)
    if target == uid.JPEGExtended12Bit:
        bits = 12 if bits_stored > 8 else 8
        return lambda f: imagecodecs.jpeg8_encode(f, level=quality.level, bitspersample=bits)
    if target in (uid.JPEGLossless, uid.JPEGLosslessSV1):
        kwargs = {"colorspace": "RGB", "outcolorspace": "RGB"} if colour else {}
        return lambda f: imagecodecs.jpeg8_encode(f, lossless=True, predictor=1,
                                                  bitspersample=bits_stored, **kwargs)
    if target in (uid.JPEGLSLossless, uid.JPEGLSNearLossless):
        near = 0 if target == uid.JPEGLSLossless else quality.jpeg_ls_near()
        return lambda f: imagecodecs.jpegls_encode(f, level=near)
    if target == uid.JPEG2000Lossless:
        mct = colour and photometric == "RGB"
        return lambda f: imagecodecs.jpeg2k_encode(f, level=0, codecformat="J2K", reversible=True,
                                                   bitspersample=bits_stored, mct=mct)
    if target == uid.JPEG2000:
        import openjpeg.utils  # pylibjpeg-openjpeg: what pydicom's JPEG2000Encoder calls

        ratio = quality.j2k_ratio() * bits_stored / bits_allocated  # as convert.py asks
        interpretation = "YBR_ICT" if photometric == "RGB" else photometric
        return lambda f: openjpeg.utils.encode_pixel_data(
            f.tobytes(), rows=rows, columns=columns, samples_per_pixel=samples,
            bits_stored=bits_stored, pixel_representation=0,
            photometric_interpretation=interpretation, use_mct=True, compression_ratios=[ratio])
    if target in (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K):
        lossless = target != uid.HTJ2K
        level = None if lossless else quality.htj2k_qstep()
        rpcl: dict[str, object] = {}
        if target == uid.HTJ2KLosslessRPCL:
            longest = max(rows, columns)
            rpcl = {"tlm": True, "resolutions": max(5, math.ceil(math.log2(max(longest, 64) / 64)))}
        return lambda f: imagecodecs.htj2k_encode(f, reversible=lossless, level=level, **rpcl)
    raise ValueError(f"no direct encoder for {syntaxes.name_of(target)}")


def direct_decoder(target: str, ds: Dataset) -> tuple[str, Decoder]:
    """imagecodecs' decoder for `target` (the library convert.py encodes with), or pylibjpeg-rle."""
    if target == uid.RLELossless:
        import rle.utils

        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
        return "pylibjpeg-rle", lambda f: rle.utils.decode_pixel_data(  # as pydicom's plugin calls it
            f, version=2, rows=rows, columns=columns, samples_per_pixel=samples, bits_allocated=bits)
    table: dict[str, tuple[str, Decoder]] = {
        uid.JPEGBaseline8Bit: ("imagecodecs jpeg8", imagecodecs.jpeg8_decode),
        uid.JPEGExtended12Bit: ("imagecodecs jpeg8", imagecodecs.jpeg8_decode),
        uid.JPEGLossless: ("imagecodecs ljpeg", imagecodecs.ljpeg_decode),
        uid.JPEGLosslessSV1: ("imagecodecs ljpeg", imagecodecs.ljpeg_decode),
        uid.JPEGLSLossless: ("imagecodecs jpegls", imagecodecs.jpegls_decode),
        uid.JPEGLSNearLossless: ("imagecodecs jpegls", imagecodecs.jpegls_decode),
        uid.JPEG2000Lossless: ("imagecodecs jpeg2k", imagecodecs.jpeg2k_decode),
        uid.JPEG2000: ("imagecodecs jpeg2k", imagecodecs.jpeg2k_decode),
        uid.HTJ2KLossless: ("imagecodecs htj2k", imagecodecs.htj2k_decode),
        uid.HTJ2KLosslessRPCL: ("imagecodecs htj2k", imagecodecs.htj2k_decode),
        uid.HTJ2K: ("imagecodecs htj2k", imagecodecs.htj2k_decode),
    }
    return table[target]


def pydicom_plugin(target: str) -> str:
    """The pydicom decoding plugin tried first for `target`: the one the pipeline decodes with."""
    try:
        from pydicom.pixels import get_decoder

        return next(iter(get_decoder(target)._available))  # private, but the only way to know
    except Exception:  # a pydicom upgrade may move it; the name is for the report only
        return "?"


# --- measuring ------------------------------------------------------------------------


@dataclass
class Pair:
    """One image: pipeline and direct, wall and CPU nanoseconds."""

    encode_pipeline: int
    encode_direct: int
    encode_pipeline_cpu: int
    encode_direct_cpu: int
    decode_pipeline: int
    decode_direct: int


@dataclass
class Result:
    """One syntax on one image set; times are medians in milliseconds per image."""

    image_set: str
    syntax: str
    name: str
    format_class: str
    status: str  # "ok", or "n/a" with the CannotConvert reason
    reason: str = ""
    images: int = 0
    rounds: int = 0
    native_bytes: int = 0
    ratio: float | None = None
    encode_ms: float | None = None
    encode_direct_ms: float | None = None
    encode_mb_s: float | None = None
    encode_direct_mb_s: float | None = None
    overhead_pct: float | None = None  # median over images of pipeline/direct - 1
    overhead_ms: float | None = None
    overhead_cpu_pct: float | None = None
    cpu_per_wall: float | None = None  # > 1 would mean a multi-threaded codec
    decode_ms: float | None = None
    decode_direct_ms: float | None = None
    decode_mb_s: float | None = None
    decode_direct_mb_s: float | None = None
    decoder_plugin: str = ""
    direct_decoder: str = ""
    psnr_db: float | None = None
    psnr_min_db: float | None = None
    lossless_exact: bool | None = None
    identical_codestream: bool | None = None
    read_ms: float | None = None  # dcmread of the native Part 10 bytes
    write_ms: float | None = None  # save_as of the converted dataset
    encode_ms_per_round: list[float] = field(default_factory=list)
    other_cpus: list[float] = field(default_factory=list)  # other processes' busy CPUs, every block
    counted_cpus: list[float] = field(default_factory=list)  # the same for the blocks counted
    disturbed_blocks: int = 0  # measured again
    disturbed_counted: int = 0  # counted anyway: the run's re-measure budget was spent


def _timed(call: Callable[[], T]) -> tuple[T, int, int]:
    """The call's value, its wall and its CPU nanoseconds (all threads of this process)."""
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    value = call()
    return value, time.perf_counter_ns() - wall, time.process_time_ns() - cpu


def _median_ms(values: list[int]) -> float:
    return statistics.median(values) / 1e6


def _mb_s(native_bytes: int, ms: float) -> float:
    return native_bytes / 1e6 / (ms / 1e3)


def _decoded(ds: Dataset, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype("<u1" if int(ds.BitsAllocated) == 8 else "<u2")
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(shape)


def measure_block(image_set: ImageSet, target: str, quality: Quality, round_: int,
                  result: Result, checks: bool) -> tuple[list[Pair], float]:
    """One round of one syntax over every image; returns the pairs and other processes' busy CPUs.

    With `checks`, also the ratio, PSNR or exactness, codestream identity
    and file read/write times (they do not change between rounds).
    """
    encode = direct_encoder(target, synthetic.read(image_set.blobs[0]), quality)
    decoder_name, decode = direct_decoder(target, synthetic.read(image_set.blobs[0]))
    result.direct_decoder = decoder_name
    # Warm-up: first calls load plugins and fill allocator pools.
    warm = convert(synthetic.read(image_set.blobs[0]), target, quality).dataset
    encode(image_set.frames[0])
    warm_blob = synthetic.part10(warm)
    convert(synthetic.read(warm_blob), uid.ExplicitVRLittleEndian)
    decode(next(generate_frames(warm.PixelData, number_of_frames=1)))

    pairs: list[Pair] = []
    encoded_total, psnrs, exact, identical, reads, writes = 0, [], True, True, [], []

    def pipeline(source: Dataset) -> Conversion:
        """As the store pipeline calls it: on a dataset read for this conversion alone. Without the
        check (decode again and compare), which bench/convert.py measures on its own."""
        return convert(source, target, quality, in_place=True, verify=False)

    before = machine.MachineSample()
    started = time.monotonic()
    for index, (blob, frame) in enumerate(zip(image_set.blobs, image_set.frames, strict=True)):
        gc.collect()
        source, read_ns, _ = _timed(lambda blob=blob: synthetic.read(blob))
        reads.append(read_ns)
        pipeline_first = (index + round_) % 2 == 0
        if pipeline_first:
            conversion, pipe_ns, pipe_cpu = _timed(lambda s=source: pipeline(s))
            codestream, direct_ns, direct_cpu = _timed(lambda f=frame: encode(f))
        else:
            codestream, direct_ns, direct_cpu = _timed(lambda f=frame: encode(f))
            conversion, pipe_ns, pipe_cpu = _timed(lambda s=source: pipeline(s))
        encoded_ds = conversion.dataset
        fragment = next(generate_frames(encoded_ds.PixelData, number_of_frames=1))
        encoded_blob, write_ns, _ = _timed(lambda d=encoded_ds: synthetic.part10(d))
        writes.append(write_ns)
        stored = synthetic.read(encoded_blob)
        decoded, dec_ns, _ = _timed(lambda s=stored: convert(s, uid.ExplicitVRLittleEndian, verify=False))
        _, dec_direct_ns, _ = _timed(lambda f=fragment: decode(f))
        pairs.append(Pair(pipe_ns, direct_ns, pipe_cpu, direct_cpu, dec_ns, dec_direct_ns))
        if checks:
            encoded_total += len(fragment)
            # Encapsulation pads an odd-length fragment with one zero byte (PS3.5 A.4).
            produced = bytes(codestream)
            identical &= fragment in (produced, produced + b"\x00")
            back = _decoded(decoded.dataset, frame.shape)
            if target in syntaxes.LOSSY:
                psnrs.append(psnr(frame, back, image_set.bits_stored))
            else:
                exact &= bool(np.array_equal(frame, back))
    elapsed = time.monotonic() - started
    other, _kernel = machine.other_cpu_seconds(before, machine.MachineSample(), 0.0)
    if checks:
        result.ratio = image_set.native_bytes * len(pairs) / encoded_total
        result.identical_codestream = identical
        result.read_ms, result.write_ms = _median_ms(reads), _median_ms(writes)
        if target in syntaxes.LOSSY:
            finite = [p for p in psnrs if p != float("inf")]
            result.psnr_db = statistics.median(psnrs) if psnrs else None
            result.psnr_min_db = min(finite) if finite else None
        else:
            result.lossless_exact = exact
    return pairs, other / elapsed


@dataclass
class Remeasure:
    """How many disturbed blocks the whole run may measure again, and how long to wait before.

    A budget for the run rather than per block: on a box where another
    session's tests run for minutes, per-block retries would stretch the
    benchmark without end; past the budget, disturbed blocks are counted and
    flagged in the table.
    """

    left: int
    wait_seconds: float


def start(image_set: ImageSet, target: str, quality: Quality, rounds: int) -> Result:
    """The result row for one syntax on one set; "n/a" when convert() refuses the images."""
    format_class = syntaxes.class_of(target) or "?"
    result = Result(image_set.name, target, syntaxes.name_of(target), format_class, "ok",
                    images=len(image_set.blobs), rounds=rounds, native_bytes=image_set.native_bytes,
                    decoder_plugin=pydicom_plugin(target))
    try:
        convert(synthetic.read(image_set.blobs[0]), target, quality)
    except CannotConvert as exc:
        result.status, result.reason = "n/a", str(exc)
    return result


def measure_round(result: Result, image_set: ImageSet, quality: Quality, round_: int,
                  remeasure: Remeasure) -> list[Pair]:
    """One round of one syntax, measured again (within the budget) when others took the CPUs."""
    while True:
        block, busy = measure_block(image_set, result.syntax, quality, round_, result, checks=round_ == 1)
        result.other_cpus.append(round(busy, 3))
        if busy <= DISTURBED_CPUS:
            break
        if remeasure.left <= 0:
            result.disturbed_counted += 1
            break
        remeasure.left -= 1
        result.disturbed_blocks += 1
        print(f"  {image_set.name} {SHORT.get(result.syntax, result.name)}: other processes kept "
              f"{busy:.2f} CPUs busy; measuring the round again", file=sys.stderr)
        machine.wait_for_quiet(timeout=remeasure.wait_seconds)
    result.counted_cpus.append(round(busy, 3))
    result.encode_ms_per_round.append(round(_median_ms([p.encode_pipeline for p in block]), 3))
    return block


def summarise(result: Result, pairs: list[Pair]) -> None:
    """Medians over every image of every round."""
    native = result.native_bytes
    result.encode_ms = _median_ms([p.encode_pipeline for p in pairs])
    result.encode_direct_ms = _median_ms([p.encode_direct for p in pairs])
    result.decode_ms = _median_ms([p.decode_pipeline for p in pairs])
    result.decode_direct_ms = _median_ms([p.decode_direct for p in pairs])
    result.encode_mb_s = _mb_s(native, result.encode_ms)
    result.encode_direct_mb_s = _mb_s(native, result.encode_direct_ms)
    result.decode_mb_s = _mb_s(native, result.decode_ms)
    result.decode_direct_mb_s = _mb_s(native, result.decode_direct_ms)
    result.overhead_pct = 100 * statistics.median(p.encode_pipeline / p.encode_direct - 1 for p in pairs)
    result.overhead_ms = statistics.median(p.encode_pipeline - p.encode_direct for p in pairs) / 1e6
    result.overhead_cpu_pct = 100 * statistics.median(
        p.encode_pipeline_cpu / max(1, p.encode_direct_cpu) - 1 for p in pairs)
    result.cpu_per_wall = statistics.median(p.encode_pipeline_cpu / p.encode_pipeline for p in pairs)


def fixed_costs(image_set: ImageSet) -> dict[str, float]:
    """The pipeline's per-image costs that do not depend on the codec, medians in ms.

    convert() (at this revision) deep-copies the dataset it is given and then
    walks every element of the result so its encoding matches the target
    (`_match_encoding`); on a fast codec these two are most of the overhead.
    Measured apart so the overhead figure can be explained, not only shown.
    """
    copies, walks, reads = [], [], []
    for blob in image_set.blobs:
        source, read_ns, _ = _timed(lambda b=blob: synthetic.read(b))
        _, copy_ns, _ = _timed(lambda s=source: copy.deepcopy(s))
        walked = synthetic.read(blob)
        _, walk_ns, _ = _timed(lambda w=walked: sum(1 for _ in w.iterall()))
        reads.append(read_ns)
        copies.append(copy_ns)
        walks.append(walk_ns)
    return {"read_ms": _median_ms(reads), "deepcopy_ms": _median_ms(copies),
            "element_walk_ms": _median_ms(walks)}


@dataclass
class SweepPoint:
    """One syntax at one lossy_quality on one set: ratio over all its images, median PSNR."""

    image_set: str
    syntax: str
    name: str
    quality: int
    ratio: float | None
    psnr_db: float | None
    encode_ms: float | None
    reason: str = ""


def sweep(image_set: ImageSet, count: int, qualities: tuple[int, ...]) -> list[SweepPoint]:
    """What lossy_quality means for each lossy syntax: ratio and PSNR through the pipeline."""
    points: list[SweepPoint] = []
    blobs, frames = image_set.blobs[:count], image_set.frames[:count]
    for target in syntaxes.LOSSY:
        for level in qualities:
            quality = Quality(level)
            sizes: list[tuple[int, int]] = []
            values, times = [], []
            try:
                for blob, frame in zip(blobs, frames, strict=True):
                    conversion, ns, _ = _timed(
                        lambda b=blob, q=quality, t=target: convert(synthetic.read(b), t, q))
                    ds = conversion.dataset
                    fragment = next(generate_frames(ds.PixelData, number_of_frames=1))
                    back = convert(synthetic.read(synthetic.part10(ds)), uid.ExplicitVRLittleEndian).dataset
                    sizes.append((frame.nbytes, len(fragment)))
                    values.append(psnr(frame, _decoded(back, frame.shape), image_set.bits_stored))
                    times.append(ns)
            except CannotConvert as exc:
                points.append(SweepPoint(image_set.name, target, syntaxes.name_of(target), level,
                                         None, None, None, str(exc)))
                break
            points.append(SweepPoint(image_set.name, target, syntaxes.name_of(target), level,
                                     sum(n for n, _ in sizes) / sum(e for _, e in sizes),
                                     statistics.median(values),
                                     _median_ms(times)))
    return points


# --- reporting --------------------------------------------------------------------------


SHORT = {
    uid.JPEGLSLossless: "JPEG-LS Lossless",
    uid.JPEG2000Lossless: "JPEG 2000 Lossless",
    uid.HTJ2KLossless: "HTJ2K Lossless",
    uid.HTJ2KLosslessRPCL: "HTJ2K Lossless RPCL",
    uid.JPEGLosslessSV1: "JPEG Lossless SV1",
    uid.JPEGLossless: "JPEG Lossless P14",
    uid.RLELossless: "RLE Lossless",
    uid.JPEGBaseline8Bit: "JPEG Baseline 8-bit",
    uid.JPEGExtended12Bit: "JPEG Extended 12-bit",
    uid.JPEGLSNearLossless: "JPEG-LS Near-Lossless",
    uid.JPEG2000: "JPEG 2000",
    uid.HTJ2K: "HTJ2K",
}


def _f(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def receive_ms_per_image() -> tuple[float, str]:
    """The appliance's receive cost per image: the last receive.json if any, else the documented one."""
    path = RESULTS / "receive.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))["median"]["appliance"]
        return 1000 * run["seconds"] / run["images"], f"{path.name} ({run['images']} images)"
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return RECEIVE_MS_DOCUMENTED, "docs/PERFORMANCE.md (f121f5c)"


def print_table(results: list[Result], image_set: ImageSet) -> None:
    print(f"\n{image_set.name}: {len(image_set.blobs)} images, {image_set.description}, "
          f"{image_set.native_bytes:,} pixel bytes each")
    header = (f"{'syntax':<22}{'ratio':>6}{'enc ms':>8}{'enc MB/s':>9}{'direct':>8}{'overhead':>9}"
              f"{'dec MB/s':>9}{'direct':>8}{'PSNR dB':>9}  notes")
    print(header)
    print("-" * len(header))
    for r in results:
        if r.status != "ok":
            print(f"{SHORT.get(r.syntax, r.name):<22}{'n/a':>6}  {r.reason}")
            continue
        notes = []
        if r.lossless_exact is False:
            notes.append("NOT BIT-EXACT")
        if r.identical_codestream is False:
            notes.append("direct codestream differs")
        if r.disturbed_blocks:
            notes.append(f"{r.disturbed_blocks} round(s) re-measured")
        if r.disturbed_counted:
            notes.append(f"{r.disturbed_counted} disturbed round(s) counted")
        quality = _f(r.psnr_db, ".1f", "exact" if r.lossless_exact else "-")
        print(f"{SHORT.get(r.syntax, r.name):<22}{r.ratio:>6.2f}{r.encode_ms:>8.2f}{r.encode_mb_s:>9.0f}"
              f"{r.encode_direct_mb_s:>8.0f}{r.overhead_pct:>8.1f}%{r.decode_mb_s:>9.0f}"
              f"{r.decode_direct_mb_s:>8.0f}{quality:>9}  {', '.join(notes)}")


def print_sync_cost(results: list[Result], receive_ms: float, source: str) -> list[dict[str, object]]:
    """What converting before the ack would cost a sender of CT, per image, against the receive path."""
    print(f"\nConverting before the C-STORE response (CT): the receive path takes {receive_ms:.2f} ms "
          f"per image ({1000 / receive_ms:.0f} images/s, {source}); a synchronous conversion adds "
          "the parse, the encode and the serialisation of the new file (the flushes stay the same)")
    header = (f"{'syntax':<22}{'encode ms':>10}{'+ read/write':>13}{'= added ms':>11}{'images/s':>9}"
              f"{'x rate':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for r in results:
        if r.image_set != "CT" or r.status != "ok" or r.encode_ms is None:
            continue
        io_ms = (r.read_ms or 0.0) + (r.write_ms or 0.0)
        added = r.encode_ms + io_ms
        rate = 1000 / (receive_ms + added)
        rows.append({"syntax": r.syntax, "encode_ms": round(r.encode_ms, 3), "read_write_ms": round(io_ms, 3),
                     "added_ms": round(added, 3), "images_per_second": round(rate, 1),
                     "rate_factor": round(receive_ms / (receive_ms + added), 3)})
        print(f"{SHORT.get(r.syntax, r.name):<22}{r.encode_ms:>10.2f}{io_ms:>13.2f}{added:>11.2f}"
              f"{rate:>9.0f}{receive_ms / (receive_ms + added):>8.2f}")
    return rows


def print_sweep(points: list[SweepPoint]) -> None:
    print("\nlossy_quality: ratio / PSNR dB (median PSNR over the sweep's images) through the pipeline")
    qualities = sorted({p.quality for p in points}, reverse=True)
    header = f"{'set':<5}{'syntax':<22}" + "".join(f"{'q=' + str(q):>14}" for q in qualities)
    print(header)
    print("-" * len(header))
    for set_name in dict.fromkeys(p.image_set for p in points):
        for target in dict.fromkeys(p.syntax for p in points if p.image_set == set_name):
            row = [p for p in points if p.image_set == set_name and p.syntax == target]
            if row[0].ratio is None:
                print(f"{set_name:<5}{SHORT.get(target, target):<22}n/a: {row[0].reason}")
                continue
            by_q = {p.quality: p for p in row}
            cells = "".join(f"{_f(by_q[q].ratio, '.1f'):>7}/{_f(by_q[q].psnr_db, '.1f'):<6}" if q in by_q
                            else f"{'':>14}" for q in qualities)
            print(f"{set_name:<5}{SHORT.get(target, target):<22}{cells}")


def versions() -> dict[str, str]:
    """Codec library versions: a new OpenJPEG or CharLS moves these figures."""
    found = {"python": platform.python_version(), "pydicom": pydicom.__version__,
             "numpy": np.__version__, "imagecodecs": imagecodecs.__version__}
    for name in ("charls", "libjpeg_turbo", "openjpeg", "openjph"):
        found[name] = imagecodecs.version(dict).get(name, "?")  # type: ignore[union-attr]
    from importlib.metadata import PackageNotFoundError, version

    for package in ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", type=int, default=40, help="CT images (default 40)")
    parser.add_argument("--rgb", type=int, default=16, help="RGB frames (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="times each syntax is measured (default 3)")
    parser.add_argument("--sweep-images", type=int, default=6,
                        help="images per set for the lossy_quality sweep (default 6; 0 = no sweep)")
    parser.add_argument("--quick", action="store_true", help="10 CT, 4 RGB, one round, small sweep")
    parser.add_argument("--syntaxes", default="",
                        help="comma-separated UIDs or pydicom keywords (default: all lossless and lossy)")
    parser.add_argument("--quality", type=int, default=StorageSettings().lossy_quality,
                        help="lossy_quality for the main table (default: the [storage] default)")
    parser.add_argument("--quiet-timeout", type=float, default=120.0,
                        help="wait up to this many seconds for idle CPUs before starting (default 120)")
    parser.add_argument("--remeasure", type=int, default=6,
                        help=f"rounds the whole run may measure again when other processes kept over "
                             f"{DISTURBED_CPUS} CPUs busy during them (default 6)")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache", help="synthetic images cache")
    parser.add_argument("--output", type=Path, default=RESULTS / "codecs.json", help="results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.ct, args.rgb, args.rounds, args.remeasure = 10, 4, 1, 1
        args.sweep_images, args.quiet_timeout = 1, min(args.quiet_timeout, 10.0)
    targets = list(syntaxes.LOSSLESS + syntaxes.LOSSY)
    if args.syntaxes:
        wanted = [syntaxes.resolve(s.strip()) for s in args.syntaxes.split(",") if s.strip()]
        if None in wanted or not wanted:
            parser.error(f"unknown syntax in {args.syntaxes!r}")
        targets = [t for t in targets if t in wanted]
    quality = Quality(args.quality)

    started = time.monotonic()
    print(f"preparing {args.ct} CT images and {args.rgb} RGB frames ...", file=sys.stderr)
    sets = load_sets(args.ct, args.rgb, args.cache)
    waited, busy = machine.wait_for_quiet(timeout=args.quiet_timeout)
    print(f"ready in {time.monotonic() - started:.1f} s (waited {waited:.0f} s for idle CPUs; "
          f"other processes now use {busy:.2f})", file=sys.stderr)

    remeasure = Remeasure(args.remeasure, min(args.quiet_timeout, 10.0))
    # Rounds outside, syntaxes inside: a slow spell of the machine then lands on
    # one round of many syntaxes, and each syntax's median over rounds shrugs it off.
    results = [start(image_set, target, quality, args.rounds) for image_set in sets for target in targets]
    pairs: dict[int, list[Pair]] = {index: [] for index in range(len(results))}
    by_name = {image_set.name: image_set for image_set in sets}
    fixed_rounds: list[dict[str, dict[str, float]]] = []
    for round_ in range(1, args.rounds + 1):
        for index, result in enumerate(results):
            if result.status != "ok":
                continue
            pairs[index] += measure_round(result, by_name[result.image_set], quality, round_, remeasure)
            if round_ == args.rounds:
                summarise(result, pairs[index])
            print(f"round {round_} {result.image_set:<4} {SHORT.get(result.syntax, result.name):<22} "
                  f"{result.encode_ms_per_round[-1]:7.2f} ms encode", file=sys.stderr)
        fixed_rounds.append({image_set.name: fixed_costs(image_set) for image_set in sets})
    for result in results:
        if result.status != "ok":
            print(f"{result.image_set:<4} {SHORT.get(result.syntax, result.name):<22} n/a: {result.reason}",
                  file=sys.stderr)
    fixed = {name: {key: statistics.median(r[name][key] for r in fixed_rounds) for key in parts}
             for name, parts in fixed_rounds[0].items()}
    points: list[SweepPoint] = []
    if args.sweep_images:
        print("lossy_quality sweep ...", file=sys.stderr)
        for image_set in sets:
            points += sweep(image_set, args.sweep_images, SWEEP_QUALITIES)

    print(f"\nCodecs at lossy_quality {quality.level}: median per image over {args.rounds} round(s); "
          "enc/dec MB/s = native pixel bytes / wall time, through the pipeline (convert) and direct "
          "(the codec call alone); overhead = pipeline encode / direct encode - 1, median over images")
    for image_set in sets:
        print_table([r for r in results if r.image_set == image_set.name], image_set)
    receive_ms, source = receive_ms_per_image()
    sync_rows = print_sync_cost(results, receive_ms, source)
    if points:
        print_sweep(points)
    ok = [r for r in results if r.status == "ok"]
    worst = max(ok, key=lambda r: r.overhead_pct or 0.0) if ok else None
    if worst is not None:
        middle = statistics.median(r.overhead_pct or 0 for r in ok)
        parts = "; ".join(f"{name}: deepcopy {f['deepcopy_ms']:.2f} ms, element walk "
                          f"{f['element_walk_ms']:.2f} ms" for name, f in fixed.items())
        print(f"\npipeline overhead on encode: median {middle:.1f} % over syntaxes, "
              f"at most {worst.overhead_pct:.1f} % ({worst.image_set} "
              f"{SHORT.get(worst.syntax, worst.name)}, {worst.overhead_ms:.2f} ms); target < 10 %")
        print(f"codec-independent costs inside convert() per image ({parts})")
    busiest = max((b for r in results for b in r.counted_cpus), default=0.0)
    print(f"other processes kept at most {busiest:.2f} CPUs busy during a counted block; every codec "
          f"ran single-threaded (CPU/wall {min((r.cpu_per_wall or 1) for r in ok):.2f}-"
          f"{max((r.cpu_per_wall or 1) for r in ok):.2f})" if ok else "")
    print("absolute rates are this machine's (see machine in the JSON); a Raspberry Pi-class core is "
          "slower by a factor not measured here, the ranking of codecs is what carries over")

    document = {
        "benchmark": "codecs",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "versions": versions(),
        "appliance_revision": appliance_revision(),
        "lossy_quality": quality.level,
        "sets": [{"name": s.name, "description": s.description, "images": len(s.blobs),
                  "native_bytes": s.native_bytes} for s in sets],
        "rounds": args.rounds,
        "disturbed_cpus_threshold": DISTURBED_CPUS,
        "results": [asdict(r) for r in results],
        "fixed_costs": fixed,
        "receive_ms_per_image": receive_ms,
        "receive_source": source,
        "synchronous_conversion": sync_rows,
        "quality_sweep": [asdict(p) for p in points],
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {args.output} ({document['elapsed_seconds']} s in all)")
    broken = [r for r in results if r.lossless_exact is False]
    for r in broken:
        print(f"FAILED: {r.image_set} {r.name}: lossless round trip is not bit-exact", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
