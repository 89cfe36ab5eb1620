"""The external disks: adopted by a field engineer, filled in mirror pairs, verified.

A disk the appliance does not know is never written to: `adopt` writes a
small identity file on it (label, UUID, role, pair) and a row in the index.
Copies go to both disks of the active pair, each one read back and checked
against the archive's sha256 before it is recorded; an image leaves the
internal spool only when two verified copies exist on external disks and it
is older than [disks] spool_days, whatever the free space.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.archive import durable
from appliance.archive.ingest import Archive, now_local
from appliance.config import DisksSettings
from appliance.disks.copier import (
    BLOCK,
    BatchOutcome,
    CopyItem,
    clear_leftovers,
    copy_batch,
    verify_batch,
    write_batch,
)
from appliance.disks.devices import Filesystem, capacity, mounted
from appliance.disks.throttle import ArrivalWatch

log = logging.getLogger("appliance.disks")

IDENTITY_FILE = ".gateway-disk.json"
ROOT = "gateway"  # everything the appliance writes on a disk lives under this folder
ROLES = ("primary", "mirror", "spare")
INTERNAL_ALERT_FRACTION = 0.10  # below 10 % free the internal disk raises an alert
FILLING_FRACTION = 0.25  # the last pair below 25 % free: time to order new disks


class DiskError(Exception):
    """A disk command cannot be done; the message says why and what to do."""


@dataclass
class Disk:
    uuid: str
    label: str
    role: str
    pair: int
    filesystem: Filesystem | None  # None when not mounted (unplugged, dead)
    device_id: int = 0  # st_dev of the mount point when found: tells a vanished disk apart

    @property
    def mounted(self) -> bool:
        return self.filesystem is not None

    @property
    def root(self) -> Path:
        assert self.filesystem is not None
        return self.filesystem.mountpoint / ROOT


def _sha256(path: Path, from_disk: bool = False) -> str:
    """sha256 of a file; `from_disk` drops its cached pages first, so a just-written
    copy is read back from the disk itself, not from memory."""
    with open(path, "rb") as fp:
        if from_disk and hasattr(os, "posix_fadvise"):
            os.fsync(fp.fileno())
            os.posix_fadvise(fp.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return hashlib.file_digest(fp, "sha256").hexdigest()


class DiskManager:
    def __init__(self, archive: Archive, settings: DisksSettings, batch_files: int = 200) -> None:
        self.archive = archive
        self.settings = settings
        self.index = archive.index
        self.batch_files = batch_files  # images written between two flushes of a disk
        self.receiving: Callable[[], bool] = ArrivalWatch(archive.index)  # slows copying when True

    # --- which disks ---------------------------------------------------------------------

    def disks(self) -> list[Disk]:
        """Every adopted disk, mounted or not, by pair then role."""
        by_uuid = {fs.uuid: fs for fs in mounted() if fs.uuid}
        rows = self.index.connection().execute(
            "SELECT uuid, label, role, pair FROM disks ORDER BY pair = 0, pair, role DESC").fetchall()
        found = []
        for uuid, label, role, pair in rows:
            fs = by_uuid.get(uuid)
            if fs is not None and not (fs.mountpoint / IDENTITY_FILE).is_file():
                fs = None  # same UUID but not our disk any more (reformatted): never write to it
            found.append(Disk(uuid, label, role, pair, fs,
                              os.stat(fs.mountpoint).st_dev if fs is not None else 0))
        return found

    def adopt(self, label: str, role: str, pair: int | None = None) -> Disk:
        if role not in ROLES:
            raise DiskError(f"role must be one of {', '.join(ROLES)}")
        candidates = [fs for fs in mounted() if fs.label == label or fs.uuid == label]
        if not candidates:
            raise DiskError(f"no mounted file system has the label or UUID {label!r}; plug the disk in "
                            "and mount it (or check the label with `blkid`)")
        fs = candidates[0]
        if os.stat(fs.mountpoint).st_dev == os.stat(self.archive.data_dir).st_dev:
            raise DiskError(f"{label} holds the internal archive ({self.archive.data_dir}); adopt an "
                            "external disk")
        if role == "spare":
            pair = 0
        elif pair is None:
            pair = self._free_slot(role)
        identity = {"label": fs.label, "uuid": fs.uuid, "role": role, "pair": pair,
                    "adopted_at": now_local().isoformat(timespec="seconds"), "appliance": "gateway"}
        durable.write_durable(fs.mountpoint / IDENTITY_FILE, json.dumps(identity, indent=2).encode(),
                              fs.mountpoint)
        durable.make_dirs_durable(fs.mountpoint / ROOT / "tmp")
        with self.index.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO disks (uuid, label, role, pair, adopted_at) "
                         "VALUES (?, ?, ?, ?, ?)", (fs.uuid, fs.label, role, pair, identity["adopted_at"]))
        log.warning("adopted disk %s (UUID %s) as %s of pair %d", fs.label, fs.uuid, role, pair)
        return Disk(fs.uuid, fs.label, role, pair, fs, os.stat(fs.mountpoint).st_dev)

    def _free_slot(self, role: str) -> int:
        taken = {row[0] for row in self.index.connection().execute(
            "SELECT pair FROM disks WHERE role = ?", (role,))}
        pair = 1
        while pair in taken:
            pair += 1
        return pair

    def pairs(self) -> dict[int, list[Disk]]:
        grouped: dict[int, list[Disk]] = {}
        for disk in self.disks():
            if disk.pair:
                grouped.setdefault(disk.pair, []).append(disk)
        return grouped

    def active_pair(self) -> tuple[int, list[Disk]] | None:
        """The first pair with a mounted disk that still has room; rotation moves past full ones."""
        floor = self.settings.min_free_gb * 1e9
        for pair, disks in sorted(self.pairs().items()):
            present = [d for d in disks if d.mounted]
            if present and all(capacity(d.filesystem.mountpoint)[1] >= floor for d in present):
                return pair, disks
        return None

    # --- copying -----------------------------------------------------------------------------

    def _missing(self, disk: Disk, limit: int, after: int = 0) -> list[tuple[int, str, str, str, int]]:
        """Spool images this disk lacks, unless another pair already holds them (rotation)."""
        return self.index.connection().execute(
            """SELECT i.id, i.sop_instance_uid, i.path, i.sha256, i.size FROM instances i
               WHERE i.spool_purged_at = '' AND i.id > ?
                 AND NOT EXISTS (SELECT 1 FROM disk_copies c WHERE c.sop_instance_uid = i.sop_instance_uid
                                   AND c.disk_uuid = ?)
                 AND NOT EXISTS (SELECT 1 FROM disk_copies c JOIN disks d ON d.uuid = c.disk_uuid
                                   WHERE c.sop_instance_uid = i.sop_instance_uid AND d.pair != ?)
               ORDER BY i.id LIMIT ?""",
            (after, disk.uuid, disk.pair, limit),
        ).fetchall()

    def copy_round(self, limit: int = 200, stop: Callable[[], bool] = lambda: False) -> int:
        """Copy up to `limit` images to each mounted disk of the active pair; return copies made.

        Both disks of the pair are filled at once, one thread each: they are
        separate devices, and a USB disk mostly waits.
        """
        active = self.active_pair()
        if active is None:
            return 0
        present = [d for d in active[1] if d.mounted]
        if len(present) == 1:
            return self._fill(present[0], limit, stop)
        with ThreadPoolExecutor(len(present), thread_name_prefix="copy") as pool:
            return sum(pool.map(lambda disk: self._fill(disk, limit, stop), present))

    def _pause(self) -> float:
        return self.settings.pause_ms / 1000 if self.settings.pause_ms and self.receiving() else 0.0

    def _fill(self, disk: Disk, limit: int, stop: Callable[[], bool]) -> int:
        """Copy batches to one disk until it lacks nothing, is full, fails or `limit` is reached.

        A batch is read back (verified) while the next one is being written:
        the disk reads and writes at once instead of taking turns.
        """
        floor = self.settings.min_free_gb * 1e9
        made, queued, cursor = 0, 0, 0
        with ThreadPoolExecutor(1, thread_name_prefix=f"verify-{disk.label}") as verifier:
            pending: Future[BatchOutcome] | None = None
            try:
                clear_leftovers(disk)
                while queued < limit and not stop():
                    rows = self._missing(disk, min(self.batch_files, limit - queued), after=cursor)
                    if not rows:
                        break
                    cursor = rows[-1][0]
                    free = capacity(disk.filesystem.mountpoint)[1]
                    batch: list[CopyItem] = []
                    for _id, uid, relative, sha, size in rows:  # free space checked before each file
                        if free < floor or free < size + BLOCK:
                            break
                        free -= size + BLOCK
                        batch.append(CopyItem(uid, self.archive.data_dir / relative, relative, sha, size))
                    written, outcome = write_batch(disk, batch, self._pause, stop)
                    queued += len(batch)
                    if pending is not None:
                        made += self._settle(disk, pending.result())
                    pending = verifier.submit(verify_batch, disk, written, outcome)
                    if outcome.stopped and not outcome.full:
                        break
                    if len(batch) < len(rows) or outcome.full:
                        log.warning("%s is below [disks] min_free_gb: rotating to the next pair", disk.label)
                        break
            except OSError as exc:
                log.error("copying to %s stopped: %s; the pair is degraded until it returns", disk.label, exc)
            finally:
                if pending is not None:
                    made += self._settle(disk, pending.result())
        return made

    def _settle(self, disk: Disk, outcome: BatchOutcome) -> int:
        """Record a verified batch and say what went wrong with the rest."""
        self._record(disk, outcome.verified)
        for item, reason in outcome.failed:
            log.error("copy of %s to %s failed: %s", item.uid, disk.label, reason)
        if outcome.stopped and not outcome.full:
            log.error("copying to %s stopped: %s; the pair is degraded until it returns",
                      disk.label, outcome.stopped)
        return len(outcome.verified)

    def _record(self, disk: Disk, verified: list[CopyItem]) -> None:
        if not verified:
            return
        stamp = now_local().isoformat(timespec="seconds")
        with self.index.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO disk_copies (sop_instance_uid, disk_uuid, path, sha256, verified_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(item.uid, disk.uuid, item.relative, item.sha256, stamp) for item in verified])

    # --- retention ----------------------------------------------------------------------------

    def purge_spool(self, now: dt.datetime | None = None) -> int:
        """Remove spool files older than spool_days that have two verified external copies."""
        cutoff = ((now or now_local()) - dt.timedelta(days=self.settings.spool_days)).isoformat()
        rows = self.index.connection().execute(
            """SELECT i.sop_instance_uid, i.path FROM instances i
               WHERE i.spool_purged_at = '' AND i.received_at < ?
                 AND (SELECT COUNT(DISTINCT disk_uuid) FROM disk_copies c
                      WHERE c.sop_instance_uid = i.sop_instance_uid) >= 2""",
            (cutoff,),
        ).fetchall()
        for uid, relative in rows:
            with self.index.transaction() as conn:
                conn.execute("UPDATE instances SET spool_purged_at = ? WHERE sop_instance_uid = ?",
                             (now_local().isoformat(timespec="seconds"), uid))
            (self.archive.data_dir / relative).unlink(missing_ok=True)
        if rows:
            log.info("removed %d image(s) from the internal spool: each has two verified copies", len(rows))
        return len(rows)

    # --- verification -------------------------------------------------------------------------

    def verify(self, label: str | None = None) -> dict[str, int]:
        """Re-read every recorded copy; repair a damaged one from its partner (or the spool)."""
        tally = {"checked": 0, "good": 0, "repaired": 0, "unrepairable": 0, "missing_disk": 0}
        disks = {d.uuid: d for d in self.disks()}
        targets = [d for d in disks.values() if label in (None, d.label, d.uuid)]
        if label is not None and not targets:
            raise DiskError(f"no adopted disk is called {label!r}; see `appliance disks status`")
        for disk in targets:
            if not disk.mounted:
                tally["missing_disk"] += 1
                continue
            for uid, relative, sha in self.index.connection().execute(
                    "SELECT sop_instance_uid, path, sha256 FROM disk_copies WHERE disk_uuid = ?",
                    (disk.uuid,)).fetchall():
                tally["checked"] += 1
                target = disk.root / relative
                if target.is_file() and _sha256(target, from_disk=True) == sha:
                    tally["good"] += 1
                    continue
                if self._repair(disk, uid, relative, sha, disks):
                    tally["repaired"] += 1
                else:
                    tally["unrepairable"] += 1
        return tally

    def _repair(self, disk: Disk, uid: str, relative: str, sha: str, disks: dict[str, Disk]) -> bool:
        sources = [self.archive.data_dir / relative]
        for other_uuid, other_path in self.index.connection().execute(
                "SELECT disk_uuid, path FROM disk_copies WHERE sop_instance_uid = ? AND disk_uuid != ?",
                (uid, disk.uuid)).fetchall():
            other = disks.get(other_uuid)
            if other is not None and other.mounted:
                sources.append(other.root / other_path)
        for source in sources:
            if source.is_file() and _sha256(source) == sha:
                # the copier's own path: device checks, a flush, a read-back from the disk itself
                outcome = copy_batch(disk, [CopyItem(uid, source, relative, sha, source.stat().st_size)])
                if outcome.verified:
                    log.warning("repaired %s on %s from %s", uid, disk.label, source)
                    return True
        log.error("%s on %s is damaged and no good copy is left to repair it from", uid, disk.label)
        return False

    # --- replacing a dead disk ------------------------------------------------------------------

    def rebuild(self, new_label: str, source_label: str) -> dict[str, int]:
        """Fill a blank replacement from the surviving disk of a pair, verify, re-point the index."""
        disks = self.disks()
        source = next((d for d in disks if source_label in (d.label, d.uuid)), None)
        if source is None or not source.mounted:
            raise DiskError(f"{source_label!r} is not an adopted, mounted disk; see `appliance disks status`")
        if source.pair == 0:
            raise DiskError(f"{source_label} is a spare; rebuild from a disk of a pair")
        partners = [d for d in disks if d.pair == source.pair and d.uuid != source.uuid]
        role = "mirror" if source.role == "primary" else "primary"
        replaced = [d for d in partners if d.role == role]
        if any(d.mounted and d.label != new_label for d in replaced):
            raise DiskError(f"pair {source.pair} still has its {role} mounted; nothing to replace")
        new = self.adopt(new_label, role, source.pair)
        tally = {"copied": 0, "failed": 0}
        rows = self.index.connection().execute(
            """SELECT c.sop_instance_uid, c.path, c.sha256, COALESCE(i.size, 0) FROM disk_copies c
               LEFT JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid
               WHERE c.disk_uuid = ? ORDER BY c.path""", (source.uuid,)).fetchall()
        items = [CopyItem(uid, source.root / relative, relative, sha, size)
                 for uid, relative, sha, size in rows]
        for start in range(0, len(items), self.batch_files):
            batch = items[start:start + self.batch_files]
            outcome = copy_batch(new, batch)
            copied = self._settle(new, outcome)
            tally["copied"] += copied
            tally["failed"] += len(batch) - copied
            if outcome.stopped:
                tally["failed"] += len(items) - start - len(batch)
                break
        if not tally["failed"]:
            with self.index.transaction() as conn:
                for old in replaced:
                    if old.uuid != new.uuid:
                        conn.execute("DELETE FROM disk_copies WHERE disk_uuid = ?", (old.uuid,))
                        conn.execute("DELETE FROM disks WHERE uuid = ?", (old.uuid,))
        log.warning("rebuilt %s from %s: %d copied, %d failed", new.label, source.label,
                    tally["copied"], tally["failed"])
        return tally

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        active = self.active_pair()
        rows = []
        for disk in self.disks():
            entry: dict[str, Any] = {"label": disk.label, "uuid": disk.uuid, "role": disk.role,
                                     "pair": disk.pair, "mounted": disk.mounted,
                                     "active": bool(active and active[0] == disk.pair and disk.mounted)}
            conn = self.index.connection()
            entry["instances"] = conn.execute("SELECT COUNT(*) FROM disk_copies WHERE disk_uuid = ?",
                                              (disk.uuid,)).fetchone()[0]
            dates = conn.execute(
                """SELECT MIN(st.study_date), MAX(st.study_date) FROM disk_copies c
                   JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid
                   JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref
                   WHERE c.disk_uuid = ?""", (disk.uuid,)).fetchone()
            entry["oldest_study_date"], entry["newest_study_date"] = dates[0] or "", dates[1] or ""
            if disk.mounted:
                total, free = capacity(disk.filesystem.mountpoint)
                entry.update(total_bytes=total, free_bytes=free, used_bytes=total - free,
                             mountpoint=str(disk.filesystem.mountpoint))
            else:
                entry.update(total_bytes=None, free_bytes=None, used_bytes=None, mountpoint=None)
            rows.append(entry)
        return rows

    @staticmethod
    def _filling(disks: list[Disk]) -> bool:
        """A pair is filling when a disk of it has less than a quarter of its space left."""
        for disk in disks:
            if disk.mounted:
                total, free = capacity(disk.filesystem.mountpoint)
                if free < FILLING_FRACTION * total:
                    return True
        return False

    def warnings(self) -> Iterator[str]:
        total, free = capacity(self.archive.data_dir)
        if free < INTERNAL_ALERT_FRACTION * total:
            held = self.index.connection().execute(
                "SELECT COUNT(*) FROM instances i WHERE i.spool_purged_at = '' AND "
                "(SELECT COUNT(DISTINCT disk_uuid) FROM disk_copies c "
                " WHERE c.sop_instance_uid = i.sop_instance_uid) < 2").fetchone()[0]
            yield (f"internal disk nearly full ({free / 1e9:.1f} GB free of {total / 1e9:.1f} GB); "
                   f"{held} image(s) lack two verified external copies and cannot leave it: "
                   "check the external disks and the copy window")
        pairs = self.pairs()
        active = self.active_pair()
        if pairs and active is None:
            yield "every disk pair is full or absent: images stay on the internal disk; add disks"
        elif active is not None:
            behind = [str(p) for p in sorted(pairs) if p < active[0]]
            if behind:
                yield (f"pair {', '.join(behind)} full or absent: copies now go to pair {active[0]}; "
                       "keep the full disks, they hold their dates")
            if active[0] == max(pairs) and (behind or self._filling(active[1])):
                yield f"pair {active[0]} is the last one: adopt new disks before it fills"
        for pair, disks in sorted(pairs.items()):
            if len(disks) < 2 or not all(d.mounted for d in disks):
                yield f"pair {pair} is degraded: " + ", ".join(
                    f"{d.label} {'present' if d.mounted else 'MISSING'}" for d in disks)
