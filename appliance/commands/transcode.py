"""`appliance transcode IN OUT --to CLASS|UID`: the archive's converter, by hand.

For a field engineer checking what a viewer will get, or fixing one file: the
same code the store and send rules use, with a report of what it did (sizes,
ratio, PSNR for lossy steps, whether the SOP Instance UID changed).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom

from appliance.config import Settings
from appliance.transcode import syntaxes
from appliance.transcode.convert import CannotConvert, Quality, convert


def target_syntax(settings: Settings, wanted: str) -> str | None:
    if wanted in syntaxes.CLASSES:
        return settings.storage.syntax(wanted)
    return syntaxes.resolve(wanted)


def psnr(reference: np.ndarray, test: np.ndarray, bits_stored: int) -> float:
    """Peak signal-to-noise ratio in dB against the full Bits Stored range."""
    error = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    if error == 0:
        return float("inf")
    peak = float((1 << bits_stored) - 1)
    return float(10 * np.log10(peak * peak / error))


def main(settings: Settings, source: str, destination: str, wanted: str, as_json: bool) -> int:
    target = target_syntax(settings, wanted)
    if target is None:
        print(f"appliance transcode: --to {wanted!r} is neither a class (uncompressed, lossless, "
              "lossy) nor a transfer syntax UID or keyword", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        print(f"appliance transcode: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    try:
        result = convert(ds, target, Quality(settings.storage.lossy_quality))
    except CannotConvert as exc:
        print(f"appliance transcode: {source} cannot become {syntaxes.name_of(target)}: {exc}",
              file=sys.stderr)
        return 1
    result.dataset.save_as(destination, enforce_file_format=True)
    report: dict[str, object] = {
        "source": source,
        "destination": destination,
        "from": result.source_syntax,
        "to": result.target_syntax,
        "bytes_in": Path(source).stat().st_size,
        "bytes_out": Path(destination).stat().st_size,
        "lossy": result.lossy,
        "sop_instance_uid_changed": result.dataset.SOPInstanceUID != ds.SOPInstanceUID,
        "sop_instance_uid": str(result.dataset.SOPInstanceUID),
    }
    if result.lossy and "PixelData" in ds:
        report["ratio"] = round(result.ratio or 0, 2)
        report["psnr_db"] = round(psnr(ds.pixel_array, pydicom.dcmread(destination).pixel_array,
                                       int(ds.BitsStored)), 2)
    if as_json:
        print(json.dumps(report))
        return 0
    print(f"{source} ({syntaxes.name_of(result.source_syntax)}, {report['bytes_in']} bytes)")
    print(f"  -> {destination} ({syntaxes.name_of(result.target_syntax)}, {report['bytes_out']} bytes)")
    if result.lossy:
        print(f"  lossy: ratio {report['ratio']}:1, PSNR {report['psnr_db']} dB, new SOP Instance UID "
              f"{report['sop_instance_uid']} (PS3.3 C.7.6.1.1.5)")
    else:
        print("  lossless: pixel data identical, SOP Instance UID kept")
    return 0
