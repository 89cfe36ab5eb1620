"""The external disks: adopted by a field engineer, filled in mirror pairs, verified.

A disk the appliance does not know is never written to: `adopt` writes a
marker on it (this appliance's identity, the disk's UUID, its role and pair,
identity.py) and a row in the index. Copies go to both disks of the active
pair, each one read back and checked against the archive's sha256 before it
is recorded as a fact about one file (disk, path, sha256); an image leaves
the internal spool only when two such copies are proven at that moment
(retention.py). Adopting, retention, verification and the status live in
their own modules; this one finds the disks and copies to them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from appliance.archive.ingest import Archive, now_local
from appliance.config import DisksSettings
from appliance.disks import identity
from appliance.disks.copier import (
    BLOCK,
    BatchOutcome,
    CopyItem,
    clear_leftovers,
    verify_batch,
    write_batch,
)
from appliance.disks.devices import Filesystem, capacity, mounted
from appliance.disks.model import ROLES, ROOT, Disk, DiskError
from appliance.disks.throttle import ArrivalWatch
from appliance.disks.tree import UnsafePath

__all__ = ["IDENTITY_FILE", "ROLES", "ROOT", "Disk", "DiskError", "DiskManager"]

log = logging.getLogger("appliance.disks")

IDENTITY_FILE = identity.IDENTITY_FILE

# Copies of the version the index points to, on a given disk / on other pairs.
MISSING_SQL = """
SELECT i.id, i.sop_instance_uid, i.path, i.sha256, i.size FROM instances i
WHERE i.spool_purged_at = '' AND i.id > ?
  AND NOT EXISTS (SELECT 1 FROM disk_copies c WHERE c.disk_uuid = ?
                    AND c.sop_instance_uid = i.sop_instance_uid AND c.sha256 = i.sha256)
  AND (SELECT COUNT(DISTINCT c.disk_uuid) FROM disk_copies c JOIN disks d ON d.uuid = c.disk_uuid
       WHERE c.sop_instance_uid = i.sop_instance_uid AND c.sha256 = i.sha256 AND d.pair != ?) < 2
ORDER BY i.id LIMIT ?"""


class DiskManager:
    def __init__(self, archive: Archive, settings: DisksSettings, batch_files: int = 200) -> None:
        self.archive = archive
        self.settings = settings
        self.index = archive.index
        self.batch_files = batch_files  # images written between two flushes of a disk
        self.receiving: Callable[[], bool] = ArrivalWatch(archive.index)  # slows copying when True
        self.last_active: int | None = None  # the pair copies went to last: rotation is said once
        self._me: str | None = None
        self.last_retention: dict[str, Any] = {}  # what the last purge removed and kept, and why

    @property
    def appliance_id(self) -> str:
        if self._me is None:
            self._me = identity.appliance_id(self.archive.data_dir)
        return self._me

    # --- which disks ---------------------------------------------------------------------

    def disks(self) -> list[Disk]:
        """Every adopted disk, mounted or not, by pair then role, each with what is wrong with it."""
        by_uuid: dict[str, list[Filesystem]] = {}
        for fs in mounted():
            if fs.uuid:
                by_uuid.setdefault(fs.uuid, []).append(fs)
        rows = self.index.connection().execute(
            "SELECT uuid, label, role, pair, appliance_id, health FROM disks "
            "ORDER BY pair = 0, pair, role DESC").fetchall()
        found = []
        for uuid, label, role, pair, owner, health in rows:
            present = by_uuid.get(uuid, [])
            if not present:
                found.append(Disk(uuid, label, role, pair, None, health=health))
                continue
            fs = present[0]
            try:
                device_id = os.stat(fs.mountpoint).st_dev
            except OSError:
                found.append(Disk(uuid, label, role, pair, None, health=health))
                continue
            disk = Disk(uuid, label, role, pair, fs, device_id, health=health)
            if len(present) > 1:
                disk.problem = (f"{len(present)} mounted file systems carry its UUID ("
                                + ", ".join(f.device for f in present) + "): one is a clone; unplug it "
                                "(nothing is written or counted until then)")
            else:
                disk.problem = self._marker_problem(disk, owner)
            found.append(disk)
        return found

    def _marker_problem(self, disk: Disk, owner: str) -> str:
        """Why this mounted disk is not the one the index adopted, or ''."""
        try:
            with disk.tree() as tree:
                marker = identity.read_marker(tree)
                if marker is None:
                    return (f"its marker {IDENTITY_FILE} is gone (wiped or reformatted): nothing is written "
                            "or counted; `appliance disks adopt` it again once checked")
                legacy = marker.appliance_id == "" and owner == ""  # adopted before markers named us
                if marker.appliance_id != self.appliance_id and not legacy:
                    return (f"its marker names another appliance ({marker.appliance_id or 'older software'})"
                            ": it was taken over; nothing is written or counted")
                if marker.uuid != disk.uuid:
                    return (f"its marker belongs to the disk with UUID {marker.uuid}: a copy; nothing is "
                            "written or counted")
                if (marker.role, marker.pair) != (disk.role, disk.pair):
                    return (f"its marker says {marker.role} of pair {marker.pair}, the index "
                            f"{disk.role} of pair {disk.pair}: nothing is written or counted")
                try:
                    tree.folder([ROOT])
                except FileNotFoundError:
                    return f"its {ROOT}/ folder is gone (wiped): nothing is counted; check the disk"
        except UnsafePath as exc:
            return exc.strerror or str(exc)
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})"
        return ""

    def adopt(self, label: str, role: str, pair: int | None = None, force: str | None = None,
              replacing: bool = False) -> Disk:
        from appliance.disks.adopt import adopt

        return adopt(self, label, role, pair, force, replacing)

    def pairs(self) -> dict[int, list[Disk]]:
        grouped: dict[int, list[Disk]] = {}
        for disk in self.disks():
            if disk.pair:
                grouped.setdefault(disk.pair, []).append(disk)
        return grouped

    def _next_fits(self, disk: Disk) -> bool:
        """The next image this disk lacks fits above [disks] min_free_gb.

        When it lacks nothing, the newest image's size stands for the next one
        to arrive: a pair that could not take the last image stays behind.
        """
        row = self._missing(disk, 1)
        if row:
            size = row[0][4]
        else:
            newest = self.index.connection().execute(
                "SELECT size FROM instances ORDER BY id DESC LIMIT 1").fetchone()
            size = newest[0] if newest else 0
        free = capacity(disk.filesystem.mountpoint)[1]
        return free - size - BLOCK >= self.settings.min_free_gb * 1e9

    def active_pair(self, pairs: dict[int, list[Disk]] | None = None) -> tuple[int, list[Disk]] | None:
        """The first pair whose writable disks all take the next image above the floor.

        Rotation moves on when the next image does not fit, not only once the
        floor is crossed: a pair with 11 MB above the floor never takes a 20 MB image.
        """
        for pair, disks in sorted((pairs if pairs is not None else self.pairs()).items()):
            writers = [d for d in disks if d.writable]
            try:
                if writers and all(self._next_fits(d) for d in writers):
                    return pair, disks
            except OSError as exc:
                log.warning("cannot read the free space of pair %d: %s", pair, exc)
        return None

    # --- copying -----------------------------------------------------------------------------

    def _missing(self, disk: Disk, limit: int, after: int = 0) -> list[tuple[int, str, str, str, int]]:
        """Images (the indexed version) this disk lacks, unless two copies exist on other pairs."""
        return self.index.connection().execute(MISSING_SQL, (after, disk.uuid, disk.pair, limit)).fetchall()

    def copy_round(self, limit: int = 200, stop: Callable[[], bool] = lambda: False) -> int:
        """Copy up to `limit` images to each writable disk of the active pair; return copies made.

        Both disks of the pair are filled at once, one thread each: they are
        separate devices, and a USB disk mostly waits. When the pair cannot
        take the next image, the next pair takes over in the same round.
        """
        made, tried = 0, set()
        while not stop():
            active = self.active_pair()
            if active is None or active[0] in tried:
                break
            if self.last_active is not None and active[0] != self.last_active:
                log.warning("pair %d cannot take the next image above [disks] min_free_gb: copies now go "
                            "to pair %d", self.last_active, active[0])
            self.last_active = active[0]
            tried.add(active[0])
            present = [d for d in active[1] if d.writable]
            if len(present) == 1:
                made += self._fill(present[0], limit, stop)
            else:
                with ThreadPoolExecutor(len(present), thread_name_prefix="copy") as pool:
                    made += sum(pool.map(lambda disk: self._fill(disk, limit, stop), present))
        return made

    def _pause(self) -> float:
        return self.settings.pause_ms / 1000 if self.settings.pause_ms and self.receiving() else 0.0

    def _fill(self, disk: Disk, limit: int, stop: Callable[[], bool]) -> int:
        """Copy batches to one disk until it lacks nothing, is full, fails or `limit` is reached.

        A batch is read back (verified) while the next one is being written:
        the disk reads and writes at once instead of taking turns. Its health
        follows: a failed write marks the disk failing, a good one clears it.
        """
        floor = self.settings.min_free_gb * 1e9
        made, queued, cursor = 0, 0, 0
        with ThreadPoolExecutor(1, thread_name_prefix=f"verify-{disk.label}") as verifier:
            pending: Future[BatchOutcome] | None = None
            try:
                self._claim_legacy_marker(disk)
                clear_leftovers(disk)
                while queued < limit and not stop():
                    rows = self._missing(disk, min(self.batch_files, limit - queued), after=cursor)
                    if not rows:
                        break
                    cursor = rows[-1][0]
                    free = capacity(disk.filesystem.mountpoint)[1]
                    batch: list[CopyItem] = []
                    for _id, uid, relative, sha, size in rows:  # each file must fit above the floor
                        if free - size - BLOCK < floor:
                            break
                        free -= size + BLOCK
                        batch.append(CopyItem(uid, self.archive.data_dir / relative, relative, sha, size))
                    written, outcome = write_batch(disk, batch, self._pause, stop)
                    queued += len(batch)
                    if written:
                        self._set_health(disk, "")
                    if pending is not None:
                        made += self._settle(disk, pending.result())
                    pending = verifier.submit(verify_batch, disk, written, outcome)
                    if outcome.stopped and not outcome.full:
                        break
                    if len(batch) < len(rows) or outcome.full:
                        break  # the pair cannot take the next image: copy_round moves to the next pair
            except OSError as exc:
                self._failed(disk, f"copying to {disk.label} stopped: {exc.strerror or exc}")
            finally:
                if pending is not None:
                    made += self._settle(disk, pending.result())
        return made

    def _claim_legacy_marker(self, disk: Disk) -> None:
        """A disk adopted before markers named their appliance gets this appliance's identity."""
        owner = self.index.connection().execute("SELECT appliance_id FROM disks WHERE uuid = ?",
                                                (disk.uuid,)).fetchone()
        if owner is None or owner[0]:
            return
        with disk.tree() as tree:
            marker = identity.Marker(self.appliance_id, disk.uuid, disk.label, disk.role, disk.pair)
            identity.write_marker(tree, marker, now_local().isoformat(timespec="seconds"))
        with self.index.transaction() as conn:
            conn.execute("UPDATE disks SET appliance_id = ? WHERE uuid = ?", (self.appliance_id, disk.uuid))

    def _failed(self, disk: Disk, reason: str) -> None:
        log.error("%s; the pair is degraded until it works again", reason)
        self._set_health(disk, reason)

    def _set_health(self, disk: Disk, reason: str) -> None:
        """Record a disk's last write error ('' clears it), for every status reader."""
        if disk.health == reason:
            return
        disk.health = reason
        with self.index.transaction() as conn:
            conn.execute("UPDATE disks SET health = ?, health_at = ? WHERE uuid = ?",
                         (reason, now_local().isoformat(timespec="seconds"), disk.uuid))

    def _settle(self, disk: Disk, outcome: BatchOutcome) -> int:
        """Record a verified batch and say what went wrong with the rest."""
        self._record(disk, outcome.verified)
        for item, reason in outcome.failed:
            log.error("copy of %s to %s failed: %s", item.uid, disk.label, reason)
        if outcome.full:
            self._set_health(disk, f"{disk.label} is full")
        elif outcome.stopped:
            self._failed(disk, f"copying to {disk.label} stopped: {outcome.stopped}")
        return len(outcome.verified)

    def _record(self, disk: Disk, verified: list[CopyItem]) -> None:
        if not verified:
            return
        stamp = now_local().isoformat(timespec="seconds")
        with self.index.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO disk_copies (disk_uuid, path, sop_instance_uid, sha256, verified_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(disk.uuid, item.relative, item.uid, item.sha256, stamp) for item in verified])

    # --- retention, verification, rebuilding, status: their own modules ----------------------

    def purge_spool(self, now: dt.datetime | None = None) -> int:
        from appliance.disks.retention import purge_spool

        return purge_spool(self, now)

    def verify(self, label: str | None = None) -> dict[str, Any]:
        from appliance.disks.upkeep import verify

        return verify(self, label)

    def rebuild(self, new_label: str, source_label: str) -> dict[str, int]:
        from appliance.disks.upkeep import rebuild

        return rebuild(self, new_label, source_label)

    def status(self) -> list[dict[str, Any]]:
        from appliance.disks.report import status

        return status(self)

    def warnings(self, now: dt.datetime | None = None) -> Iterator[str]:
        from appliance.disks.report import warnings

        return warnings(self, now)
