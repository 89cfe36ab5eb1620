"""`appliance transcode IN OUT --to CLASS|UID`: the archive's converter, by hand.

For a field engineer checking what a viewer will get, or fixing one file: the
same verified conversion the store and send rules use, with a report of what
it did (sizes, ratio, PSNR for lossy steps, whether the SOP Instance UID
changed). Bad input is an expected outcome here, never a traceback: one
line on stderr naming the file and the reason, and an exit code per kind of
trouble (README). OUT is never left partial or unverified: the result is
written to a temporary file in OUT's folder, read back and checked, then
renamed over OUT; on any failure the temporary file is removed and an
existing OUT is untouched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pydicom

from appliance.config import Settings
from appliance.dicom.structure import IncompleteDataset, check_part10
from appliance.transcode import syntaxes
from appliance.transcode.convert import CannotConvert, Conversion, ConversionRefused, Quality, convert
from appliance.transcode.errors import one_line
from appliance.transcode.verify import psnr

# Exit codes (README, `appliance transcode`).
CONVERTED = 0
BAD_ARGUMENTS = 2
UNREADABLE_INPUT = 3
CANNOT_HOLD = 4
REFUSED = 5
CANNOT_WRITE = 6


class Failed(Exception):
    """One expected failure: the exit code and the line to print."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def target_syntax(settings: Settings, wanted: str) -> str | None:
    if wanted in syntaxes.CLASSES:
        return settings.storage.syntax(wanted)
    return syntaxes.resolve(wanted)


def main(settings: Settings, source: str, destination: str, wanted: str, as_json: bool) -> int:
    try:
        return _transcode(settings, source, destination, wanted, as_json)
    except Failed as failure:
        print(f"appliance transcode: {failure}", file=sys.stderr)
        return failure.code


def _transcode(settings: Settings, source: str, destination: str, wanted: str, as_json: bool) -> int:
    target = target_syntax(settings, wanted)
    if target is None:
        raise Failed(BAD_ARGUMENTS, f"--to {one_line(wanted)!r} is neither a class (uncompressed, "
                     "lossless, lossy) nor a transfer syntax UID or keyword")
    name = one_line(source)
    ds = _read(source)
    try:
        result = convert(ds, target, Quality(settings.storage.lossy_quality),
                         min_psnr=settings.storage.lossy_min_psnr)
    except ConversionRefused as exc:
        raise Failed(REFUSED, f"{name}: not converted to {syntaxes.name_of(target)}, {one_line(exc)}; "
                     "the file is left as it is") from None
    except CannotConvert as exc:
        raise Failed(CANNOT_HOLD, f"{name} cannot become {syntaxes.name_of(target)}: "
                     f"{one_line(exc)}") from None
    _write_verified(result, Path(destination))
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
    if result.lossy:
        report["ratio"] = round(result.ratio or 0, 2)
        report["psnr_db"] = round(result.psnr, 2) if result.psnr is not None else None
    if as_json:
        print(json.dumps(report))
        return CONVERTED
    print(f"{source} ({syntaxes.name_of(result.source_syntax)}, {report['bytes_in']} bytes)")
    print(f"  -> {destination} ({syntaxes.name_of(result.target_syntax)}, {report['bytes_out']} bytes)")
    if result.lossy:
        print(f"  lossy: ratio {report['ratio']}:1, PSNR {report['psnr_db']} dB, new SOP Instance UID "
              f"{report['sop_instance_uid']} (PS3.3 C.7.6.1.1.5)")
    else:
        print("  lossless: pixel data decoded again and identical, SOP Instance UID kept")
    return CONVERTED


def _read(source: str) -> pydicom.Dataset:
    """The input, checked complete first (the archive's own walk): pydicom reads a truncated
    file without a word, and its missing pixel data would read as "nothing to convert"."""
    name = one_line(source)
    try:
        with open(source, "rb") as fp:
            check_part10(fp, os.fstat(fp.fileno()).st_size)
    except FileNotFoundError:
        raise Failed(UNREADABLE_INPUT, f"{name}: no such file") from None
    except IsADirectoryError:
        raise Failed(UNREADABLE_INPUT, f"{name}: is a folder, not a file") from None
    except OSError as exc:
        raise Failed(UNREADABLE_INPUT, f"{name}: cannot be read: {exc.strerror or exc}") from None
    except IncompleteDataset as exc:
        raise Failed(UNREADABLE_INPUT, f"{name}: not a complete DICOM Part 10 file: "
                     f"{one_line(exc)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source)
    except Exception as exc:  # pydicom raises many types for a file that is not (valid) DICOM
        raise Failed(UNREADABLE_INPUT, f"{name}: not a readable DICOM file: {one_line(exc)}") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise Failed(UNREADABLE_INPUT, f"{name}: no Transfer Syntax UID in the file meta header "
                     "(not a Part 10 file)")
    return ds


def _write_verified(result: Conversion, destination: Path) -> None:
    """Temporary file beside OUT, written, read back and compared, then renamed over OUT."""
    folder = destination.parent if str(destination.parent) else Path(".")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise Failed(CANNOT_WRITE, f"{one_line(destination)}: cannot write in {one_line(folder)}: "
                     f"{exc.strerror or exc}") from None
    try:
        with os.fdopen(handle, "wb") as fp:
            result.dataset.save_as(fp, enforce_file_format=True)
            fp.flush()
            os.fsync(fp.fileno())
        _check_written(Path(temporary), result)
        os.replace(temporary, destination)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise Failed(CANNOT_WRITE, f"{one_line(destination)}: cannot be written: "
                     f"{exc.strerror or exc}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_written(path: Path, result: Conversion) -> None:
    """The file on disk says what the verified dataset says (a write error shows here, not later)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = pydicom.dcmread(path)
    same = (str(written.file_meta.TransferSyntaxUID) == result.target_syntax
            and written.SOPInstanceUID == result.dataset.SOPInstanceUID
            and written.get("PixelData") == result.dataset.get("PixelData"))
    if not same:
        raise OSError(f"the written file {path.name} does not read back as the converted object")


__all__ = ["main", "psnr", "target_syntax"]
