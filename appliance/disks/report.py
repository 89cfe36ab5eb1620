"""What the disks look like to a field engineer: one row per disk, and the warnings.

Every row carries a `state` (active, ready, missing, untrusted, read-only,
failing) and a `health` sentence saying what is wrong and what to do; the
CLI, `appliance status`, the page and /metrics all show these same fields.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from appliance.disks.devices import capacity
from appliance.disks.model import Disk
from appliance.disks.retention import backlog

if TYPE_CHECKING:
    from appliance.disks.manager import DiskManager

INTERNAL_ALERT_FRACTION = 0.10  # below 10 % free the internal disk raises an alert
FILLING_FRACTION = 0.25  # the last pair below 25 % free: time to order new disks


def _health(disk: Disk) -> str:
    if not disk.mounted:
        return "not mounted: plug it in"
    if disk.problem:
        return disk.problem
    if disk.read_only:
        return (f"mounted read-only at {disk.filesystem.mountpoint}: nothing is copied to it; remount it "
                "read-write (mount -o remount,rw)")
    return disk.health


def status(manager: DiskManager) -> list[dict[str, Any]]:
    disks = manager.disks()
    grouped: dict[int, list[Disk]] = {}
    for disk in disks:
        if disk.pair:
            grouped.setdefault(disk.pair, []).append(disk)
    active = manager.active_pair(grouped)
    conn = manager.index.connection()
    rows = []
    for disk in disks:
        on = bool(active and active[0] == disk.pair and disk.writable)
        state, health = disk.state(on), _health(disk)
        if state == "ready" and disk.pair and not manager._next_fits(disk):
            state, health = "full", "the next image does not fit above [disks] min_free_gb"
        entry: dict[str, Any] = {"label": disk.label, "uuid": disk.uuid, "role": disk.role,
                                 "pair": disk.pair, "mounted": disk.mounted, "active": on,
                                 "state": state, "health": health,
                                 "read_only": disk.read_only, "trusted": disk.trusted}
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


def _filling(disks: list[Disk]) -> bool:
    """A pair is filling when a disk of it has less than a quarter of its space left."""
    for disk in disks:
        if disk.mounted:
            total, free = capacity(disk.filesystem.mountpoint)
            if free < FILLING_FRACTION * total:
                return True
    return False


def _lacking(manager: DiskManager) -> int:
    """Images on the internal disk without two recorded copies of their current version."""
    return manager.index.connection().execute(
        "SELECT COUNT(*) FROM instances i WHERE i.spool_purged_at = '' AND "
        "(SELECT COUNT(DISTINCT disk_uuid) FROM disk_copies c "
        " WHERE c.sop_instance_uid = i.sop_instance_uid AND c.sha256 = i.sha256) < 2").fetchone()[0]


def warnings(manager: DiskManager, now: dt.datetime | None = None) -> Iterator[str]:
    total, free = capacity(manager.archive.data_dir)
    if free < INTERNAL_ALERT_FRACTION * total:
        yield (f"internal disk nearly full ({free / 1e9:.1f} GB free of {total / 1e9:.1f} GB); "
               f"{_lacking(manager)} image(s) lack two verified external copies and cannot leave it: "
               "check the external disks and the copy window")
    disks = manager.disks()
    pairs: dict[int, list[Disk]] = {}
    for disk in disks:
        if disk.pair:
            pairs.setdefault(disk.pair, []).append(disk)
    for disk in disks:
        if disk.mounted and (disk.problem or disk.read_only or disk.health):
            yield f"disk {disk.label} ({disk.role}, pair {disk.pair}) {disk.state()}: {_health(disk)}"
    active = manager.active_pair(pairs)
    if pairs and active is None:
        yield (f"every disk pair is full or absent: {_lacking(manager)} image(s) lack two copies and stay "
               "on the internal disk; add disks")
    elif active is not None:
        behind = [str(p) for p in sorted(pairs) if p < active[0]]
        if behind:
            yield (f"pair {', '.join(behind)} full or absent: copies now go to pair {active[0]}; "
                   "keep the full disks, they hold their dates")
        if active[0] == max(pairs) and (behind or _filling(active[1])):
            yield f"pair {active[0]} is the last one: adopt new disks before it fills"
    for pair, members in sorted(pairs.items()):
        if len(members) < 2 or not all(d.writable for d in members):
            yield f"pair {pair} is degraded: " + ", ".join(f"{d.label} {_word(d)}" for d in members)
    waiting, none = backlog(manager, disks, now)
    if waiting:
        unusable = [d.label for d in disks if not d.trusted]
        why = (f"; not counted: {', '.join(unusable)} (missing or untrusted)" if unusable else "")
        yield (f"{waiting} image(s) older than spool_days wait on the internal disk for a second proven "
               f"copy ({none} have none){why}")


def _word(disk: Disk) -> str:
    return {"missing": "MISSING", "active": "present", "ready": "present"}.get(disk.state(), disk.state())
