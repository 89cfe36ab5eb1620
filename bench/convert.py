"""What the conversion check costs: throughput with the verification on and off.

    .venv/bin/python bench/convert.py            # what `make bench` runs (about a minute)
    .venv/bin/python bench/convert.py --quick    # a smoke test

Every conversion the appliance makes (store format, forward, `appliance
transcode`) decodes its result again and compares it with the source
(`appliance/transcode/verify.py`); compressed sources are decoded a second
time by another decoder. This measures, for the conversions a site actually
runs, `convert(ds, target, in_place=True)` as the convert service calls it,
on a dataset freshly parsed from its Part 10 bytes (parsing not timed), with
`verify=True` and `verify=False` on the same image back to back (the order
alternating), medians over images and rounds.

Sets: the synthetic CT series of bench/synthetic.py (512x512, 12 bits
stored in 16) and 640x480 8-bit RGB frames (ultrasound/endoscope). MB/s
counts native pixel bytes (Rows x Columns x samples x bytes), whichever way
the conversion goes. Results: a table on stdout and bench/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import synthetic
from pydicom import uid
from pydicom.dataset import Dataset
from receive import appliance_revision, machine_description

from appliance.transcode.convert import convert
from appliance.transcode.syntaxes import name_of

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# (set, stored syntax, target): what the store format and the forwarder do most.
CASES = [
    ("CT", uid.ExplicitVRLittleEndian, uid.JPEGLSLossless),
    ("CT", uid.ExplicitVRLittleEndian, uid.JPEG2000Lossless),
    ("CT", uid.ExplicitVRLittleEndian, uid.HTJ2KLossless),
    ("CT", uid.ExplicitVRLittleEndian, uid.RLELossless),
    ("CT", uid.ExplicitVRLittleEndian, uid.JPEG2000),
    ("CT", uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian),
    ("CT", uid.JPEGLSLossless, uid.ExplicitVRLittleEndian),
    ("CT", uid.JPEG2000Lossless, uid.ExplicitVRLittleEndian),
    ("RGB", uid.ExplicitVRLittleEndian, uid.JPEGBaseline8Bit),
    ("RGB", uid.JPEGBaseline8Bit, uid.ExplicitVRLittleEndian),
]


def sources(count: int, cache: Path) -> dict[str, list[bytes]]:
    ct = [path.read_bytes() for path in synthetic.cached(synthetic.CTSpec(count=count), cache)]
    rgb = [synthetic.part10(ds) for ds in synthetic.rgb_datasets(synthetic.RGBSpec(count=count))]
    return {"CT": ct, "RGB": rgb}


def stored_as(blobs: list[bytes], syntax: str) -> list[bytes]:
    """The images as the archive would hold them in `syntax` (made once, not timed)."""
    if syntax == uid.ExplicitVRLittleEndian:
        return blobs
    return [synthetic.part10(convert(synthetic.read(b), syntax, verify=False).dataset) for b in blobs]


def native_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    return int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated) // 8 * frames


def measure(blobs: list[bytes], target: str, rounds: int) -> dict[str, float]:
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_number in range(rounds):
        for n, blob in enumerate(blobs):
            order = (True, False) if (n + round_number) % 2 == 0 else (False, True)
            for verify in order:
                ds = synthetic.read(blob)
                start = time.perf_counter()
                convert(ds, target, in_place=True, verify=verify)
                times[verify].append(time.perf_counter() - start)
    size = native_bytes(synthetic.read(blobs[0]))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"native_bytes": size, "ms_off": off * 1000, "ms_on": on * 1000,
            "images_per_s_off": 1 / off, "images_per_s_on": 1 / on,
            "mb_per_s_off": size / off / 1e6, "mb_per_s_on": size / on / 1e6,
            "check_cost_percent": (on - off) / off * 100}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="images per set")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 images, 1 round")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache", help="synthetic images cache")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 3, 1
    sets = sources(args.images, args.cache)
    rows = []
    print(f"{'conversion':<58} {'check off':>17} {'check on':>17} {'cost':>6}")
    print(f"{'':<58} {'img/s':>8} {'MB/s':>8} {'img/s':>8} {'MB/s':>8}")
    for set_name, stored, target in CASES:
        blobs = stored_as(sets[set_name], stored)
        convert(synthetic.read(blobs[0]), target)  # warm the codecs' imports
        row = {"set": set_name, "from": name_of(stored), "to": name_of(target),
               **measure(blobs, target, args.rounds)}
        rows.append(row)
        label = f"{set_name}: {row['from']} -> {row['to']}"[:58]
        print(f"{label:<58} {row['images_per_s_off']:>8.1f} {row['mb_per_s_off']:>8.1f} "
              f"{row['images_per_s_on']:>8.1f} {row['mb_per_s_on']:>8.1f} "
              f"{row['check_cost_percent']:>5.0f}%", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "convert.json").write_text(json.dumps({
        "command": " ".join(["bench/convert.py", *(argv if argv is not None else sys.argv[1:])]),
        "revision": appliance_revision(), "machine": machine_description(),
        "images": args.images, "rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
