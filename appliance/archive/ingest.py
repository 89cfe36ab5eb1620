"""The archive's one door: every producer of an instance comes through here.

C-STORE, `appliance import`, and later the capture and folder-watcher
services all hand a complete DICOM Part 10 file to `Archive.ingest_file()`.
This module alone owns the file layout, the durable write and the index row,
so the durability rule is written once:

    temp file in <data_dir>/tmp -> check it is complete -> fsync -> rename into
    the tree -> fsync the directory -> commit the index row -> only then success

A crash at any instant leaves either nothing indexed or a complete, indexed
object; temp files of dead processes are removed at start.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import secrets
import shutil
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.archive import durable, layout, quarantine
from appliance.archive.clock import now_local
from appliance.archive.digests import dataset_digest, file_digest, stored_dataset_digest
from appliance.archive.doors import FrontDoors
from appliance.archive.errors import Conflict, OutOfSpace, Rejected
from appliance.archive.index import Index
from appliance.archive.quarantine import discard
from appliance.archive.record import InstanceRecord, UnreadableObject, read_record
from appliance.dicom.structure import DEFAULT_LIMITS, Limits
from appliance.peertext import printable
from appliance.processes import pid_alive

log = logging.getLogger("appliance.archive")

LOCK_STRIPES = 64
TEMP_SUFFIX = ".part"

IndexedHook = Callable[[sqlite3.Connection, int, InstanceRecord], None]


@dataclass(frozen=True)
class Stored:
    outcome: Literal["stored", "duplicate", "replaced", "kept-first"]
    record: InstanceRecord
    path: Path
    sha256: str
    size: int


class Archive(FrontDoors):
    """The archive tree under <data_dir>, its temp area, quarantine and index."""

    def __init__(self, data_dir: Path, *, min_free_bytes: int = 0, limits: Limits = DEFAULT_LIMITS) -> None:
        self.data_dir = data_dir
        self.limits = limits  # nesting and inflate bounds of the structure walk
        self.root = data_dir / "archive"
        self.temp_dir = data_dir / "tmp"
        self.lock_dir = data_dir / "locks"
        self.replaced_dir = data_dir / "replaced"
        self.quarantine_dir = data_dir / "quarantine"
        self.min_free_bytes = min_free_bytes
        # What a sender's different content under another sender's SOP Instance UID does
        # ([storage] on_conflict); the DICOM service sets it from the configuration.
        self.on_conflict = "replace"
        self.on_indexed: list[IndexedHook] = []
        for directory in (self.root, self.temp_dir, self.lock_dir):
            durable.make_dirs_durable(directory)
        self.index = Index(data_dir / "index.sqlite")

    # --- temp files ------------------------------------------------------------

    def new_temp_path(self) -> Path:
        """A fresh temp name on the archive's file system, tagged with our pid."""
        return self.temp_dir / f"{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"

    def cleanup_temp(self) -> int:
        """Remove temp files left by processes that are no longer running."""
        removed = 0
        for entry in self.temp_dir.iterdir():
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and pid_alive(int(pid_text)):
                continue  # a running importer or receiver is still writing it
            try:
                entry.unlink()
                removed += 1
            except IsADirectoryError:
                shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                pass
        if removed:
            log.info("removed %d leftover temp file(s) from %s", removed, self.temp_dir)
        return removed

    def free_bytes(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize

    def check_space(self, incoming: int) -> None:
        free = self.free_bytes()
        if free < self.min_free_bytes + incoming:
            raise OutOfSpace(
                f"only {free // 1_000_000} MB free on {self.data_dir} (reserve "
                f"{self.min_free_bytes // 1_000_000} MB): free space or add disks; "
                "storing resumes by itself"
            )

    # --- the door --------------------------------------------------------------

    def ingest_file(
        self,
        temp: Path,
        *,
        calling_ae: str = "",
        source: str = "",
        received: dt.datetime | None = None,
        keep_previous: bool = True,
        expect: Callable[[InstanceRecord], str | None] | None = None,
    ) -> Stored:
        """Archive the complete Part 10 file `temp`, which lies in our temp dir.

        The temp file is consumed: moved into the tree, into quarantine, or
        removed. Raises OutOfSpace (try later) or Rejected (quarantined).
        `keep_previous=False` is for the store-format conversion: the previous
        file holds the same image in another encoding and is removed, not kept
        under replaced/. `expect(record)` may name a reason to refuse the object
        (the C-STORE command and the dataset disagree): it is then quarantined.
        """
        received = received or now_local()
        try:
            size = temp.stat().st_size
            # The temp file already holds its blocks on the archive's file
            # system and the rename into the tree takes none: only the reserve
            # must still be intact. (Counting `size` again refused any image
            # with less than twice its size free above the reserve.)
            self.check_space(0)
            with open(temp, "rb") as fp:
                try:
                    record, walk = read_record(fp, size, source or temp.name, self.limits)
                except UnreadableObject as exc:
                    raise Rejected(str(exc), None) from None
                refusal = expect(record) if expect is not None else None
                if refusal:
                    raise Rejected(refusal, None)
                digest = file_digest(fp)
                dataset_offset = walk.dataset_offset
                os.fsync(fp.fileno())
        except Rejected as exc:
            quarantined = self.quarantine(temp, exc.reason, calling_ae=calling_ae, source=source)
            raise Rejected(exc.reason, quarantined) from None
        except OSError as exc:
            discard(temp)
            if durable.is_out_of_space(exc):
                raise OutOfSpace(f"cannot write to {self.data_dir}: {exc.strerror}") from exc
            raise
        except OutOfSpace:
            discard(temp)
            raise
        try:
            with self._instance_lock(record.sop_instance_uid):
                return self._place(temp, record, digest, dataset_offset, size, calling_ae, source,
                               received, keep_previous)
        except (OSError, sqlite3.Error) as exc:
            # The lock file or the index lookup failed before _place took the
            # temp file over (or _place already dropped it): never leave it behind.
            discard(temp)
            if _is_space_error(exc):
                raise OutOfSpace(f"cannot archive on {self.data_dir}: {exc}") from exc
            raise

    def _place(
        self,
        temp: Path,
        record: InstanceRecord,
        digest: str,
        dataset_offset: int,
        size: int,
        calling_ae: str,
        source: str,
        received: dt.datetime,
        keep_previous: bool = True,
    ) -> Stored:
        relative = layout.instance_path(
            study_date=record.study_date,
            modality=record.modality,
            patient_id=record.patient_id,
            sop_instance_uid=record.sop_instance_uid,
            received=received,
        )
        target = self.root / relative
        existing = self.index.stored_file(record.sop_instance_uid)
        old_path = self.data_dir / existing["path"] if existing is not None else None
        if old_path is not None and not old_path.is_file():
            old_path = None  # known instance whose file is gone (purged): store anew
        if existing is None:
            derived = self._kept_as_derivation(record.sop_instance_uid, temp, dataset_offset)
            if derived is not None:
                discard(temp)
                return Stored("duplicate", record, derived, "", size)
        if existing is not None and old_path is not None:
            if dataset_digest(temp, dataset_offset) == stored_dataset_digest(existing, old_path):
                discard(temp)
                return Stored("duplicate", record, old_path, existing["sha256"], size)
            if keep_previous and self.on_conflict != "replace":
                kept_first = self._conflict(temp, record, old_path, calling_ae, source)
                if kept_first is not None:
                    return Stored("kept-first", record, old_path, existing["sha256"], size)
            if old_path == target:
                # The acknowledged version stays where the index points until the
                # new one is committed, so the new one takes a name of its own.
                target = target.with_name(f"{target.stem}~{digest[:8]}{target.suffix}")
        placed = False
        try:
            durable.move_durable(temp, target, sync_source_dir=False)
            placed = True
            with self.index.transaction() as conn:
                row = self.index.upsert_instance(
                    conn,
                    record,
                    path=str(target.relative_to(self.data_dir)),
                    size=size,
                    sha256=digest,
                    dataset_sha256="",
                    calling_ae=calling_ae,
                    source=source,
                    received_at=received.isoformat(timespec="milliseconds"),
                )
                for hook in self.on_indexed:
                    hook(conn, row, record)
        except (OSError, sqlite3.Error) as exc:
            discard(target if placed else temp)
            if _is_space_error(exc):
                raise OutOfSpace(f"cannot archive on {self.data_dir}: {exc}") from exc
            raise
        if old_path is None:
            return Stored("stored", record, target, digest, size)
        if not keep_previous:
            if old_path != target:
                discard(old_path)
            return Stored("replaced", record, target, digest, size)
        kept = self.replaced_dir / received.strftime("%Y%m%d-%H%M%S-%f") / existing["path"]
        try:
            durable.move_durable(old_path, kept)
        except OSError as exc:  # the new version is safe; the old one stays where it was
            log.error("cannot move the replaced file %s to %s: %s", old_path, kept, exc)
            kept = old_path
        log.warning(
            "SOP Instance %s received again with different content from %s; "
            "new file %s, previous one kept as %s",
            record.sop_instance_uid, calling_ae or source, target, kept,
        )
        return Stored("replaced", record, target, digest, size)

    def _conflict(self, temp: Path, record: InstanceRecord, old_path: Path, calling_ae: str,
                  source: str) -> Path | None:
        """Apply on_conflict when another sender re-sends an instance with other content.

        A sender correcting its own image (same calling AE) always replaces, as
        do the importer and the store-format conversion (no calling AE). Between
        two DICOM senders, "keep-first" keeps the stored version and answers
        success (the new bytes go to quarantine, so an acknowledged object is
        never lost), "reject" refuses with Conflict. Returns the quarantined path
        for keep-first, None when the new version is to replace the old one.
        """
        first = (self.index.instance(record.sop_instance_uid) or {}).get("calling_ae") or ""
        if not calling_ae or not first or first == calling_ae:
            return None
        reason = (f"SOP Instance {printable(record.sop_instance_uid)} already stored from "
                  f"{printable(first)} with other content ([storage] on_conflict = {self.on_conflict})")
        quarantined = self.quarantine(temp, reason, calling_ae=calling_ae, source=source)
        if self.on_conflict == "reject":
            raise Conflict(reason, quarantined)
        log.warning("%s from %s: kept the first version %s; the new one is in %s", reason,
                    printable(calling_ae), old_path, quarantined)
        return quarantined or old_path

    def index_in_place(self, path: Path, *, source: str = "check") -> Stored:
        """The door for a complete file found in the tree without an index row.

        A crash between the rename and the index commit, or an index that lost
        rows, leaves such files. They were acknowledged, so they are indexed
        where they lie, with the same `on_indexed` hooks as a receipt (forward
        jobs, conversions) in the same transaction. A file whose instance is
        indexed at another path that exists, or was indexed at this path
        meanwhile (a receipt committing while we looked), or an original the
        archive keeps as a lossy derived instance, is left alone ("duplicate",
        with the indexed path).
        Raises UnreadableObject when the file is not a complete object.
        """
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            record, walk = read_record(fp, size, str(path))
            digest = file_digest(fp)
        received = dt.datetime.fromtimestamp(path.stat().st_mtime).astimezone()
        relative = str(path.relative_to(self.data_dir))
        with self._instance_lock(record.sop_instance_uid):
            existing = self.index.stored_file(record.sop_instance_uid)
            indexed = self.data_dir / existing["path"] if existing is not None else None
            if indexed is not None and (indexed == path or indexed.is_file()):  # indexed meanwhile, or
                return Stored("duplicate", record, indexed, existing["sha256"], size)  # held elsewhere
            derived = self._kept_as_derivation(record.sop_instance_uid, path, walk.dataset_offset)
            if existing is None and derived is not None:  # an original a lossy conversion replaced
                return Stored("duplicate", record, derived, "", size)
            with self.index.transaction() as conn:
                row = self.index.upsert_instance(
                    conn, record, path=relative, size=size, sha256=digest, dataset_sha256="", calling_ae="",
                    source=source, received_at=received.isoformat(timespec="milliseconds"))
                for hook in self.on_indexed:
                    hook(conn, row, record)
        return Stored("stored", record, path, digest, size)

    def _kept_as_derivation(self, sop_instance_uid: str, temp: Path, dataset_offset: int) -> Path | None:
        """The archive stores this original lossy-compressed under another UID: the
        same original received again is a duplicate, not a new image to compress
        once more (which would give the PACS a second copy)."""
        derivation = self.index.derivation(sop_instance_uid)
        if derivation is None:
            return None
        if dataset_digest(temp, dataset_offset) != derivation["original_dataset_sha256"]:
            return None
        derived = self.index.stored_file(derivation["derived_sop_instance_uid"])
        return self.data_dir / derived["path"] if derived else None

    def remove_instance(self, sop_instance_uid: str, conn: sqlite3.Connection) -> Path | None:
        """Drop an instance's row inside the caller's transaction; return its file,
        which the caller removes once the transaction is committed."""
        row = conn.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        conn.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return self.data_dir / row[0] if row else None

    # --- quarantine ------------------------------------------------------------

    def quarantine(self, temp: Path, reason: str, *, calling_ae: str = "", source: str = "") -> Path | None:
        """Keep the bytes of a rejected object with the reason beside them (quarantine.keep)."""
        return quarantine.keep(self.quarantine_dir, self.temp_dir, temp, reason, calling_ae=calling_ae,
                               source=source)

    # --- locking ---------------------------------------------------------------

    @contextmanager
    def _instance_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Serialise work on one SOP Instance UID across threads and processes."""
        stripe = zlib.crc32(sop_instance_uid.encode("utf-8", "replace")) % LOCK_STRIPES
        fd = os.open(self.lock_dir / f"{stripe:02d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _is_space_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return "disk is full" in text or "disk i/o" in text or "readonly" in text
    return durable.is_out_of_space(exc)


