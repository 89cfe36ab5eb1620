"""`appliance import PATH...`: bring DICOM files in through the archive's door.

For a CD from another hospital, a USB stick, or an old gateway's folder:
every file goes through `Archive.ingest_copy()`, the same door as C-STORE,
so layout, durability, duplicates and quarantine behave the same. The report
says what was imported, what was already there, what was skipped (not DICOM,
DICOMDIR, not a regular file) and what was rejected (and where its bytes
were kept).

Only regular files are opened, and only after a non-blocking check: a FIFO
or a device in the folder would otherwise block the import forever at its
`open()`. A file or folder it cannot read is *failed*, not skipped: the
exit code says the import is incomplete, whoever runs it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from appliance.archive import open_archive
from appliance.archive.ingest import OutOfSpace, Rejected
from appliance.config import Settings

MEDIA_DIRECTORY_CLASS = b"1.2.840.10008.1.3.10"
OUTCOMES = ("imported", "present", "replaced", "skipped", "rejected", "failed")


class Unreadable(Exception):
    """A file or folder the import could not read: the import is incomplete."""


def walk(paths: list[Path]) -> Iterator[Path | Unreadable]:
    """Every file under `paths`, sorted; a folder that cannot be listed is yielded as Unreadable."""
    problems: list[OSError] = []
    for path in paths:
        if path.is_dir():
            for folder, dirs, files in os.walk(path, onerror=problems.append):
                while problems:
                    failed = problems.pop(0)
                    yield Unreadable(f"{failed.filename}: cannot list folder: {failed.strerror}")
                dirs.sort()
                for name in sorted(files):
                    yield Path(folder) / name
            while problems:
                failed = problems.pop(0)
                yield Unreadable(f"{failed.filename}: cannot list folder: {failed.strerror}")
        else:
            yield path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _skip_reason(path: Path) -> str | None:
    """Why a file is not an image to import, decided from its type and first bytes.

    Raises Unreadable when it cannot be opened or read.
    """
    if path.name.upper() == "DICOMDIR":
        return "DICOMDIR (media index, not an image)"
    try:
        mode = os.stat(path).st_mode  # follows a link, never opens
        if not stat.S_ISREG(mode):
            return f"not a regular file ({_kind(mode)})"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # swapped for a FIFO since: no hang
        with open(fd, "rb") as fp:
            if not stat.S_ISREG(os.fstat(fp.fileno()).st_mode):
                return "not a regular file (changed while importing)"
            head = fp.read(1024)
    except OSError as exc:
        raise Unreadable(f"{path}: cannot read: {exc.strerror}") from None
    if head[128:132] == b"DICM":
        return "DICOMDIR (media index, not an image)" if MEDIA_DIRECTORY_CLASS in head else None
    if _looks_like_raw_dataset(head):
        return None
    return "not a DICOM file"


def _looks_like_raw_dataset(head: bytes) -> bool:
    """Old media hold datasets without the Part 10 header: they start with a
    group 0x0002 or 0x0008 element, little or big endian."""
    if len(head) < 8:
        return False
    return head[0:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def run_import(settings: Settings, paths: list[Path], log_line=print) -> Counter:
    archive = open_archive(settings)
    tally: Counter = Counter()
    for path in walk(paths):
        if isinstance(path, Unreadable):
            tally["failed"] += 1
            log_line(f"failed    {path}")
            continue
        try:
            reason = _skip_reason(path)
        except Unreadable as exc:
            tally["failed"] += 1
            log_line(f"failed    {exc}")
            continue
        if reason:
            tally["skipped"] += 1
            log_line(f"skipped   {path}: {reason}")
            continue
        try:
            stored = archive.ingest_copy(path, source=f"import {path}")
        except Rejected as exc:
            tally["rejected"] += 1
            where = f"; bytes kept in {exc.quarantined}" if exc.quarantined else ""
            log_line(f"rejected  {path}: {exc.reason}{where}")
            continue
        except OutOfSpace as exc:
            tally["failed"] += 1
            log_line(f"failed    {path}: {exc}")
            log_line("stopping: the archive is out of space; free space and run the import again")
            break
        except OSError as exc:
            tally["failed"] += 1
            log_line(f"failed    {path}: {exc.strerror or exc}")
            continue
        word = {"stored": "imported", "duplicate": "present", "replaced": "replaced"}[stored.outcome]
        tally[word] += 1
        log_line(f"{word:<9} {path} -> {stored.path}")
    return tally


def main(settings: Settings, paths: list[str], as_json: bool) -> int:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"appliance import: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    tally = run_import(settings, [Path(p) for p in paths], log_line=(lambda _l: None) if as_json else print)
    summary = {k: tally.get(k, 0) for k in OUTCOMES}
    if as_json:
        print(json.dumps(summary))
    else:
        print(
            f"imported {summary['imported']}, already present {summary['present']}, "
            f"replaced {summary['replaced']}, skipped {summary['skipped']}, "
            f"rejected {summary['rejected']}, failed {summary['failed']}"
        )
    return 1 if summary["rejected"] or summary["failed"] else 0
