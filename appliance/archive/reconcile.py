"""Reconciling the archive tree with its index: fsck for the archive (`appliance check`).

The archive promises that an acknowledged object is on disk and indexed.
Two failures break that promise without anyone noticing:

- a crash between the rename into the tree and the index commit leaves a
  complete file without a row; an index that lost rows (its WAL deleted,
  then a kill) leaves several. Such a file is re-indexed where it lies,
  through the archive's door (`Archive.index_in_place`), so its forward jobs
  and conversion are queued as if it had just been received;
- a row whose file is gone (deleted by hand, a bad disk) is reported: an
  image the index promises and cannot give. Rows of images that retention
  removed on purpose (proven copies on external disks) are not counted.

The cheap part (names and sizes, no file read except the ones to re-index)
runs at every start of the dicom service, in the background; `--verify`
also reads every file and compares its SHA-256 with the index.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.archive.ingest import Archive
from appliance.archive.record import UnreadableObject

log = logging.getLogger("appliance.check")


@dataclass
class CheckReport:
    files: int = 0
    rows: int = 0
    reindexed: list[str] = field(default_factory=list)  # files found without a row, now indexed
    duplicates: list[str] = field(default_factory=list)  # a second file of an instance indexed elsewhere
    unreadable: list[str] = field(default_factory=list)  # "path: reason": files that are not objects
    missing: list[str] = field(default_factory=list)  # "path (uid)": rows whose file is gone
    corrupt: list[str] = field(default_factory=list)  # --verify: "path: why" (checksum differs)
    verified: int = 0

    def problems(self) -> list[str]:
        """What needs a person, one line each (re-indexed files were repaired: not a problem)."""
        lines = [f"indexed image missing from the archive: {entry}" for entry in self.missing]
        lines += [f"file in the archive that is not a readable object: {entry}" for entry in self.unreadable]
        lines += [f"file whose checksum differs from the index: {entry}" for entry in self.corrupt]
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _indexed(archive: Archive) -> dict[str, tuple[str, str, bool]]:
    """path -> (SOP Instance UID, sha256, purged on purpose) for every row."""
    rows = archive.index.connection().execute(
        "SELECT path, sop_instance_uid, sha256, spool_purged_at FROM instances")
    return {row[0]: (row[1], row[2], bool(row[3])) for row in rows}


def check(archive: Archive, verify: bool = False) -> CheckReport:
    """Compare the tree with the index, re-index what is missing from it, report the rest.

    Raises sqlite3.Error when the index cannot be read at all.
    """
    report = CheckReport()
    indexed = _indexed(archive)
    report.rows = len(indexed)
    on_disk: set[str] = set()
    for path in sorted(archive.root.rglob("*.dcm")):
        if not path.is_file():
            continue
        report.files += 1
        relative = str(path.relative_to(archive.data_dir))
        on_disk.add(relative)
        if relative not in indexed:
            _reindex(archive, path, report)
        elif verify:
            _verify(path, indexed[relative][1], report)
    for relative, (uid, _sha256, purged) in sorted(indexed.items()):
        if relative not in on_disk and not purged:
            report.missing.append(f"{relative} ({uid})")
    for line in report.problems():
        log.error("%s", line)
    return report


def _reindex(archive: Archive, path: Path, report: CheckReport) -> None:
    try:
        stored = archive.index_in_place(path)
    except UnreadableObject as exc:
        report.unreadable.append(str(exc))
        return
    except (OSError, sqlite3.Error) as exc:
        report.unreadable.append(f"{path}: {exc}")
        return
    if stored.outcome == "duplicate" and stored.path == path:
        return  # a receipt committed its row while we looked: nothing to do
    if stored.outcome == "duplicate":
        report.duplicates.append(f"{path} (indexed as {stored.path})")
        log.warning("%s holds an instance indexed at %s: left as it is", path, stored.path)
        return
    report.reindexed.append(str(path.relative_to(archive.data_dir)))
    log.warning("re-indexed %s (%s): it was in the archive without an index row; its forward jobs "
                "and conversion are queued", path, stored.record.sop_instance_uid)


def _verify(path: Path, expected: str, report: CheckReport) -> None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fp:
            for block in iter(lambda: fp.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        report.corrupt.append(f"{path}: cannot read: {exc.strerror}")
        return
    report.verified += 1
    if digest.hexdigest() != expected:
        report.corrupt.append(f"{path}: SHA-256 {digest.hexdigest()[:12]}…, index says {expected[:12]}…")


class BackgroundCheck(threading.Thread):
    """The cheap check at service start, off the receive path: stores are answered meanwhile.

    Its findings are published in the service's state (`warnings`), which
    `appliance status` and the status page show; `index_problem` says the
    index cannot be read at all (the service is then unhealthy).
    """

    def __init__(self, archive: Archive) -> None:
        super().__init__(name="archive-check", daemon=True)
        self.archive = archive
        self.report: CheckReport | None = None
        self.index_problem = ""

    def run(self) -> None:
        try:
            self.report = check(self.archive)
        except sqlite3.Error as exc:
            self.index_problem = f"the index {self.archive.index.path} cannot be read: {exc}"
            log.error("%s; stores are refused (0xA700) until it is repaired", self.index_problem)
            return
        except OSError as exc:
            log.error("the archive check at start could not finish: %s", exc)
            return
        found = self.report
        log.info("archive check at start: %d files, %d index rows, %d re-indexed, %d problem(s)",
                 found.files, found.rows, len(found.reindexed), len(found.problems()))

    def state(self) -> dict[str, Any]:
        warnings = [self.index_problem] if self.index_problem else []
        if self.report is not None:
            warnings += self.report.problems()[:20]
            hidden = len(self.report.problems()) - 20
            if hidden > 0:
                warnings.append(f"and {hidden} more archive problem(s): run `appliance check`")
        found = self.report
        return {"warnings": warnings, "check": None if found is None else {
            "files": found.files, "rows": found.rows, "reindexed": len(found.reindexed),
            "missing": len(found.missing), "unreadable": len(found.unreadable)}}
