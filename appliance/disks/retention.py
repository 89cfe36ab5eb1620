"""Retention: an image leaves the internal disk only when two external copies are proven now.

Index rows are not proof: a disk may have been wiped, re-pointed with a
link, taken over by another appliance or cloned since the row was written,
and a re-sent image has new bytes its old copies do not hold. So, at the
moment of deleting, for the version the index points to (its sha256), two
distinct adopted disks must be mounted (read-only is enough), be trusted
(our identity, the role and pair of the index, no clone: `Disk.trusted`),
and each hold a regular file reached without any link on the disk's own
file system whose hash matched at a verification no older than
[disks] verified_within_hours. An older verification is repeated on the spot
(the copy is read back from the disk); a copy that fails is no longer a
copy. Otherwise the image stays, and the status says how many wait and why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections import Counter
from contextlib import ExitStack
from typing import TYPE_CHECKING

from appliance.archive.ingest import now_local
from appliance.disks.model import ROOT, Disk
from appliance.disks.tree import DiskTree, UnsafePath, components

if TYPE_CHECKING:
    from appliance.disks.manager import DiskManager

log = logging.getLogger("appliance.disks")


def check_copy(tree: DiskTree, relative: str, sha256: str, size: int, reread: bool) -> tuple[str, bool]:
    """('', False) when the copy is a regular file of the right size (and hash, when `reread`);
    else (why not, whether a link, another device or a non-file stands in its way)."""
    try:
        fd = tree.open_file(components(relative, ROOT))
    except FileNotFoundError:
        return "gone", False
    except UnsafePath as exc:
        return exc.strerror or "behind a link", True
    try:
        if os.fstat(fd).st_size != size:
            return "wrong size", False
        if reread:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            with os.fdopen(fd, "rb", closefd=False) as fp:
                if hashlib.file_digest(fp, "sha256").hexdigest() != sha256:
                    return "content differs from the archive's sha256", False
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})", False
    finally:
        os.close(fd)
    return "", False


def purge_spool(manager: DiskManager, now: dt.datetime | None = None) -> int:
    """Remove internal files older than spool_days whose two external copies are proven now."""
    now = now or now_local()
    settings = manager.settings
    cutoff = (now - dt.timedelta(days=settings.spool_days)).isoformat()
    fresh_after = (now - dt.timedelta(hours=settings.verified_within_hours)).isoformat()
    disks = {d.uuid: d for d in manager.disks() if d.trusted}
    conn = manager.index.connection()
    candidates = conn.execute(
        "SELECT sop_instance_uid, path, sha256, size FROM instances "
        "WHERE spool_purged_at = '' AND received_at < ? ORDER BY id", (cutoff,)).fetchall()
    removed, waiting = 0, Counter()
    with ExitStack() as stack:
        trees: dict[str, DiskTree | None] = {}
        for uid, relative, sha, size in candidates:
            proven: set[int] = set()
            for disk_uuid, on_disk, verified_at in conn.execute(
                    "SELECT disk_uuid, path, verified_at FROM disk_copies "
                    "WHERE sop_instance_uid = ? AND sha256 = ?", (uid, sha)).fetchall():
                disk = disks.get(disk_uuid)
                if disk is None or disk.device_id in proven:
                    continue
                tree = _tree(stack, trees, disk)
                if tree is None:
                    continue
                reread = verified_at < fresh_after
                why, _unsafe = check_copy(tree, on_disk, sha, size, reread)
                if why:
                    _forget(manager, disk, on_disk, uid, why)
                    continue
                if reread:
                    with manager.index.transaction() as tx:
                        tx.execute("UPDATE disk_copies SET verified_at = ? WHERE disk_uuid = ? AND path = ?",
                                   (now.isoformat(timespec="seconds"), disk_uuid, on_disk))
                proven.add(disk.device_id)
            if len(proven) < 2:
                waiting["one proven copy" if proven else "no proven copy"] += 1
                continue
            with manager.index.transaction() as tx:
                changed = tx.execute("UPDATE instances SET spool_purged_at = ? "
                                     "WHERE sop_instance_uid = ? AND sha256 = ? AND path = ?",
                                     (now_local().isoformat(timespec="seconds"), uid, sha, relative)).rowcount
            if not changed:
                continue  # a new version arrived meanwhile: it needs copies of its own
            (manager.archive.data_dir / relative).unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d image(s) from the internal spool: each has two copies proven just now", removed)
    if waiting:
        log.info("%d image(s) past spool_days stay on the internal disk: %s", sum(waiting.values()),
                 ", ".join(f"{n} with {why}" for why, n in sorted(waiting.items())))
    manager.last_retention = {"removed": removed, "waiting": sum(waiting.values()), "reasons": dict(waiting)}
    return removed


def _tree(stack: ExitStack, trees: dict[str, DiskTree | None], disk: Disk) -> DiskTree | None:
    if disk.uuid not in trees:
        try:
            trees[disk.uuid] = stack.enter_context(disk.tree())
        except OSError as exc:
            log.warning("cannot prove copies on %s: %s", disk.label, exc)
            trees[disk.uuid] = None
    return trees[disk.uuid]


def _forget(manager: DiskManager, disk: Disk, on_disk: str, uid: str, why: str) -> None:
    """A recorded copy that fails its proof is no copy: drop the row, say so once."""
    log.warning("the copy of %s on %s (%s) is not proven: %s; it no longer counts", uid, disk.label,
                on_disk, why)
    with manager.index.transaction() as tx:
        tx.execute("DELETE FROM disk_copies WHERE disk_uuid = ? AND path = ?", (disk.uuid, on_disk))


def backlog(manager: DiskManager, disks: list[Disk], now: dt.datetime | None = None) -> tuple[int, int]:
    """(images past spool_days still on the internal disk with fewer than two recorded copies of
    their current version on trusted mounted disks, how many of those have none): cheap, no reading."""
    cutoff = ((now or now_local()) - dt.timedelta(days=manager.settings.spool_days)).isoformat()
    trusted = [d.uuid for d in disks if d.trusted]
    marks = ",".join("?" * len(trusted)) or "''"
    rows = manager.index.connection().execute(
        f"""SELECT (SELECT COUNT(DISTINCT c.disk_uuid) FROM disk_copies c
                    WHERE c.sop_instance_uid = i.sop_instance_uid AND c.sha256 = i.sha256
                      AND c.disk_uuid IN ({marks})) AS n
            FROM instances i WHERE i.spool_purged_at = '' AND i.received_at < ?""",
        (*trusted, cutoff)).fetchall()
    short = [n for (n,) in rows if n < 2]
    return len(short), sum(1 for n in short if n == 0)

