"""Store in the site's format without making a sender wait: convert after the ack.

The receiver stores every object as it arrived (durable, indexed, acked), and
the ingest transaction queues a conversion when [storage] format asks for
another syntax (`StorePolicy.queue_conversion`). The `convert` service works
the queue (`Converter`): it re-encodes the file and puts the result back
through the archive's door, so the durability rule holds for the converted
file too, and a crash or a slow lossy encode never costs a sender anything.

- Lossless steps keep the SOP Instance UID: the new file replaces the old
  one (not kept under replaced/: it is the same image).
- A lossy step makes a new instance (PS3.3 C.7.6.1.1.5). Its UID is derived
  from the original's, the syntax and the quality, so a retry after a crash
  makes the same instance, not a second one. The original's row and file go;
  a derivation row remembers it, so the same original sent again is a
  duplicate, not a new image to compress again.
- An object that cannot be converted stays as received; the reason is logged
  and kept in the queue row (state "kept"). Nothing is dropped or refused.
  When the conversion was tried and failed its check (a corrupt or
  mislabelled stream, a result that is not the source), the log line is a
  WARNING and the refusal is counted (`refusals.py`); when the syntax simply
  cannot hold the image (16-bit data and JPEG Baseline), it is a WARNING too
  (the object is not in the site's format), not counted as a refusal.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import warnings

import pydicom
from pydicom.uid import generate_uid

from appliance.archive.ingest import Archive, OutOfSpace, Rejected, now_local
from appliance.archive.record import InstanceRecord
from appliance.config import StorageSettings
from appliance.transcode.convert import CannotConvert, ConversionRefused, Quality, convert
from appliance.transcode.errors import one_line
from appliance.transcode.policy import store_target
from appliance.transcode.refusals import report_refusal
from appliance.transcode.syntaxes import name_of

log = logging.getLogger("appliance.convert")

MAX_ATTEMPTS = 3


class StorePolicy:
    """The ingest hook that queues a conversion when the store rule asks for one."""

    def __init__(self, storage: StorageSettings) -> None:
        self.storage = storage

    def target(self, received_syntax: str) -> str | None:
        return store_target(received_syntax, self.storage.format, self.storage.syntax("lossless"),
                            self.storage.syntax("lossy"))

    def queue_conversion(self, conn: sqlite3.Connection, _row: int, record: InstanceRecord) -> None:
        target = self.target(record.transfer_syntax_uid)
        if target is None:
            conn.execute("DELETE FROM conversions WHERE sop_instance_uid = ? AND state = 'pending'",
                         (record.sop_instance_uid,))
            return
        conn.execute(
            """INSERT INTO conversions (sop_instance_uid, target_syntax, state, attempts, detail,
                                        updated_at)
               VALUES (?, ?, 'pending', 0, '', ?)
               ON CONFLICT(sop_instance_uid) DO UPDATE SET target_syntax = excluded.target_syntax,
                 state = 'pending', attempts = 0, detail = '', updated_at = excluded.updated_at""",
            (record.sop_instance_uid, target, now_local().isoformat(timespec="seconds")),
        )


class Converter:
    """Works the conversion queue, one object at a time."""

    def __init__(self, archive: Archive, storage: StorageSettings) -> None:
        self.archive = archive
        self.storage = storage
        self.quality = Quality(storage.lossy_quality)
        self.converted = 0
        self.kept = 0
        self.refused = 0

    def backlog(self) -> int:
        return self.archive.index.connection().execute(
            "SELECT COUNT(*) FROM conversions WHERE state = 'pending'"
        ).fetchone()[0]

    def run_once(self) -> bool:
        """Convert the next queued object; False when the queue is empty."""
        conn = self.archive.index.connection()
        job = conn.execute(
            "SELECT id, sop_instance_uid, target_syntax, attempts FROM conversions "
            "WHERE state = 'pending' ORDER BY id LIMIT 1"
        ).fetchone()
        if job is None:
            return False
        job_id, uid, target, attempts = job
        try:
            outcome, detail = self._convert(uid, target)
        except OutOfSpace as exc:
            log.error("converting %s waits for disk space: %s", uid, exc)
            return False
        except Exception as exc:  # a bug must not stop the queue: retry, then keep as received
            log.exception("converting %s to %s failed", uid, name_of(target))
            outcome = "pending" if attempts + 1 < MAX_ATTEMPTS else "kept"
            detail = f"attempt {attempts + 1}: {exc}"
        with self.archive.index.transaction() as tx:
            tx.execute("UPDATE conversions SET state = ?, attempts = attempts + 1, detail = ?, "
                       "updated_at = ? WHERE id = ? AND target_syntax = ?",
                       (outcome, detail[:500], now_local().isoformat(timespec="seconds"), job_id, target))
        return True

    def _convert(self, uid: str, target: str) -> tuple[str, str]:
        row = self.archive.index.instance(uid)
        if row is None:
            return "done", "instance no longer in the archive"
        path = self.archive.data_dir / row["path"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception as exc:  # pydicom raises many types for a file damaged past its header
            reason = f"archive file {row['path']} cannot be read: {one_line(exc)}"
            report_refusal(log, self.archive.index, uid, target, "store", reason, "kept as received")
            self.kept += 1
            self.refused += 1
            return "kept", reason
        stored = str(ds.file_meta.TransferSyntaxUID)
        if stored == target:
            return "done", "already in that syntax"
        derived_uid = generate_uid(entropy_srcs=[uid, target, str(self.quality.level)])
        try:
            result = convert(ds, target, self.quality, derived_uid=derived_uid, in_place=True,
                             min_psnr=self.storage.lossy_min_psnr)
        except ConversionRefused as exc:
            report_refusal(log, self.archive.index, uid, target, "store", exc, "kept as received")
            self.kept += 1
            self.refused += 1
            return "kept", one_line(exc)
        except CannotConvert as exc:
            # Not a failed check (not counted), but the archive is not in the site's format for it.
            log.warning("%s stays as received (%s), not stored as %s: %s", one_line(uid, 80),
                        name_of(stored), name_of(target), one_line(exc))
            self.kept += 1
            return "kept", str(exc)
        received = dt.datetime.fromisoformat(row["received_at"])
        source = f"{row['source']} (stored as {name_of(target)})"
        try:
            # A lossless result replaces the file (same image); a lossy one is a new instance.
            self.archive.ingest_dataset(result.dataset, calling_ae=row["calling_ae"], source=source,
                                        received=received, keep_previous=result.lossy)
            if result.lossy:
                self._retire_original(uid, derived_uid, path)
        except Rejected as exc:
            return "kept", f"converted object refused by the archive: {exc.reason}"
        self.converted += 1
        ratio = f", ratio {result.ratio:.1f}:1" if result.ratio else ""
        log.info("%s stored as %s%s", uid, name_of(target), ratio)
        return "done", name_of(target) + ratio

    def _retire_original(self, uid: str, derived_uid: str, path) -> None:
        """The lossy version is indexed: the original's row goes, a derivation row stays."""
        from appliance.archive.digests import dataset_digest
        from appliance.dicom.structure import check_part10

        with open(path, "rb") as fp:
            offset = check_part10(fp, path.stat().st_size).dataset_offset
        original_digest = dataset_digest(path, offset)
        with self.archive.index.transaction() as tx:
            old = self.archive.remove_instance(uid, tx)
            tx.execute(
                "INSERT OR REPLACE INTO derivations (original_sop_instance_uid, derived_sop_instance_uid, "
                "original_dataset_sha256) VALUES (?, ?, ?)",
                (uid, derived_uid, original_digest),
            )
        if old is not None:
            old.unlink(missing_ok=True)
