"""Verifying, repairing and rebuilding external disks, through the same verified copier.

Verification re-reads every recorded copy from the disk itself, reached
without links (tree.py). A copy behind a link is reported, never read through
and never "repaired" through; its row is dropped (it is no copy). A damaged
or missing copy is repaired from the internal spool or the partner disk, the
source checked against the recorded sha256 first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from appliance.archive.ingest import now_local
from appliance.disks.copier import CopyItem, copy_batch
from appliance.disks.model import ROOT, Disk, DiskError
from appliance.disks.retention import check_copy
from appliance.disks.tree import DiskTree, components

if TYPE_CHECKING:
    from appliance.disks.manager import DiskManager

log = logging.getLogger("appliance.disks")


def verify(manager: DiskManager, label: str | None = None) -> dict[str, Any]:
    """Re-read every recorded copy; repair a damaged one from its partner (or the spool).

    `problems` lists, one sentence each, the links and untrusted disks found.
    """
    tally: dict[str, Any] = {"checked": 0, "good": 0, "repaired": 0, "unrepairable": 0, "missing_disk": 0,
                             "links": 0, "untrusted_disk": 0, "problems": []}
    disks = {d.uuid: d for d in manager.disks()}
    targets = [d for d in disks.values() if label in (None, d.label, d.uuid)]
    if label is not None and not targets:
        raise DiskError(f"no adopted disk is called {label!r}; see `appliance disks status`")
    stamp = now_local().isoformat(timespec="seconds")
    for disk in targets:
        if not disk.mounted:
            tally["missing_disk"] += 1
            continue
        if disk.problem:
            tally["untrusted_disk"] += 1
            if "link" in disk.problem:
                tally["links"] += 1
            tally["problems"].append(f"{disk.label}: {disk.problem}")
            continue
        rows = manager.index.connection().execute(
            "SELECT sop_instance_uid, path, sha256 FROM disk_copies WHERE disk_uuid = ? ORDER BY path",
            (disk.uuid,)).fetchall()
        with disk.tree() as tree, ExitStack() as stack:
            for uid, relative, sha in rows:
                tally["checked"] += 1
                why, unsafe = check_copy(tree, relative, sha, _size(tree, relative), reread=True)
                if not why:
                    tally["good"] += 1
                    with manager.index.transaction() as tx:
                        tx.execute("UPDATE disk_copies SET verified_at = ? WHERE disk_uuid = ? AND path = ?",
                                   (stamp, disk.uuid, relative))
                    continue
                if unsafe:
                    tally["links"] += 1
                    tally["problems"].append(f"{disk.label}: {why}")
                    log.error("verify: %s", why)
                    with manager.index.transaction() as tx:
                        tx.execute("DELETE FROM disk_copies WHERE disk_uuid = ? AND path = ?",
                                   (disk.uuid, relative))
                    continue
                if _repair(manager, stack, disk, uid, relative, sha, disks):
                    tally["repaired"] += 1
                else:
                    tally["unrepairable"] += 1
    return tally


def _size(tree: DiskTree, relative: str) -> int:
    """The size to expect: the file's own (verify compares the hash, which says it all)."""
    try:
        return tree.entry(components(relative, ROOT)).st_size
    except OSError:
        return -1


def _sha256_fd(fd: int) -> str:
    with os.fdopen(fd, "rb", closefd=False) as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def _repair(manager: DiskManager, stack: ExitStack, disk: Disk, uid: str, relative: str, sha: str,
            disks: dict[str, Disk]) -> bool:
    items: list[CopyItem] = []
    spool = manager.archive.data_dir / relative
    if spool.is_file():
        with open(spool, "rb") as fp:
            if hashlib.file_digest(fp, "sha256").hexdigest() == sha:
                items.append(CopyItem(uid, spool, relative, sha, spool.stat().st_size))
    for other_uuid, other_path in manager.index.connection().execute(
            "SELECT disk_uuid, path FROM disk_copies WHERE sop_instance_uid = ? AND sha256 = ? "
            "AND disk_uuid != ?", (uid, sha, disk.uuid)).fetchall():
        other = disks.get(other_uuid)
        if other is None or not other.trusted:
            continue
        try:
            tree = stack.enter_context(other.tree())
            fd = tree.open_file(components(other_path, ROOT))
        except OSError:
            continue
        try:
            if _sha256_fd(fd) == sha:
                items.append(CopyItem(uid, other_path, relative, sha, os.fstat(fd).st_size, tree))
        finally:
            os.close(fd)
    for item in items:
        # the copier's own path: no links, device checks, a flush, a read-back from the disk itself
        outcome = copy_batch(disk, [item])
        if outcome.verified:
            log.warning("repaired %s on %s from %s", uid, disk.label, item.source)
            return True
    log.error("%s on %s is damaged and no good copy is left to repair it from", uid, disk.label)
    return False


def rebuild(manager: DiskManager, new_label: str, source_label: str) -> dict[str, int]:
    """Fill a blank replacement from the surviving disk of a pair, verify, re-point the index."""
    disks = manager.disks()
    source = next((d for d in disks if source_label in (d.label, d.uuid)), None)
    if source is None or not source.mounted:
        raise DiskError(f"{source_label!r} is not an adopted, mounted disk; see `appliance disks status`")
    if source.problem:
        raise DiskError(f"{source.label} cannot be a source: {source.problem}")
    if source.pair == 0:
        raise DiskError(f"{source_label} is a spare; rebuild from a disk of a pair")
    partners = [d for d in disks if d.pair == source.pair and d.uuid != source.uuid]
    role = "mirror" if source.role == "primary" else "primary"
    replaced = [d for d in partners if d.role == role]
    if any(d.mounted and d.label != new_label for d in replaced):
        raise DiskError(f"pair {source.pair} still has its {role} mounted; nothing to replace")
    new = manager.adopt(new_label, role, source.pair, replacing=True)
    tally = {"copied": 0, "failed": 0}
    rows = manager.index.connection().execute(
        """SELECT c.sop_instance_uid, c.path, c.sha256, COALESCE(i.size, 0) FROM disk_copies c
           LEFT JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid AND i.sha256 = c.sha256
           WHERE c.disk_uuid = ? ORDER BY c.path""", (source.uuid,)).fetchall()
    with source.tree() as tree:
        items = [CopyItem(uid, relative, relative, sha, size, tree) for uid, relative, sha, size in rows]
        for start in range(0, len(items), manager.batch_files):
            batch = items[start:start + manager.batch_files]
            outcome = copy_batch(new, batch)
            copied = manager._settle(new, outcome)
            tally["copied"] += copied
            tally["failed"] += len(batch) - copied
            if outcome.stopped:
                tally["failed"] += len(items) - start - len(batch)
                break
    if not tally["failed"]:
        with manager.index.transaction() as conn:
            for old in replaced:
                if old.uuid != new.uuid:
                    conn.execute("DELETE FROM disk_copies WHERE disk_uuid = ?", (old.uuid,))
                    conn.execute("DELETE FROM disks WHERE uuid = ?", (old.uuid,))
    log.warning("rebuilt %s from %s: %d copied, %d failed", new.label, source.label,
                tally["copied"], tally["failed"])
    return tally

