"""`appliance disks adopt`: making a disk this appliance's, or refusing with the reason.

A disk has one place: one appliance, one role, one pair. Adopting a disk the
index already knows in another place, a disk another appliance adopted, or a
`dd` clone of a known disk (the same file-system UUID) is refused, each with
a one-line reason. Two mounted disks with one label must be told apart by
UUID. A foreign disk is taken over only with `--force takeover`, and the
takeover is written to the audit trail. Adopting a disk again in the same
place re-writes its marker and folders (a wiped disk comes back this way).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from appliance.archive.ingest import now_local
from appliance.disks import identity
from appliance.disks.devices import Filesystem, mounted
from appliance.disks.model import ROLES, ROOT, Disk, DiskError
from appliance.disks.tree import DiskTree, UnsafePath, components

if TYPE_CHECKING:
    from appliance.disks.manager import DiskManager

log = logging.getLogger("appliance.disks")

CONFIRM_WORD = "takeover"  # `--force takeover`: a takeover is never one stray flag away


def _pick(label: str) -> tuple[Filesystem, list[Filesystem]]:
    """The one mounted file system called `label` (label or UUID), and every file system mounted."""
    everything = mounted()
    candidates = [fs for fs in everything if label in (fs.label, fs.uuid)]
    if not candidates:
        raise DiskError(f"no mounted file system has the label or UUID {label!r}; plug the disk in "
                        "and mount it (or check the label with `blkid`)")
    if len(candidates) > 1:
        listed = "; ".join(f"UUID {fs.uuid or '(none)'} on {fs.device} at {fs.mountpoint}"
                           for fs in candidates)
        if len({fs.uuid for fs in candidates}) == 1:
            raise DiskError(f"{len(candidates)} mounted disks carry the UUID {candidates[0].uuid} "
                            f"({listed}): one is a clone (dd); unplug it, or give it a new UUID "
                            "(tune2fs -U random)")
        raise DiskError(f"{len(candidates)} mounted disks are labelled {label!r}: adopt one by its UUID "
                        f"({listed})")
    return candidates[0], everything


def adopt(manager: DiskManager, label: str, role: str, pair: int | None, force: str | None,
          replacing: bool) -> Disk:
    """Adopt the disk `label` as `role` of `pair`; `replacing` lets rebuild take a dead disk's place."""
    if role not in ROLES:
        raise DiskError(f"role must be one of {', '.join(ROLES)}")
    if force is not None and force != CONFIRM_WORD:
        raise DiskError(f"to take over a disk, confirm with the word: --force {CONFIRM_WORD}")
    fs, everything = _pick(label)
    name = fs.label or fs.uuid
    if not fs.uuid:
        raise DiskError(f"{name} has no file-system UUID; format it (mkfs.ext4 -L LABEL) before adopting")
    clones = [other for other in everything if other.uuid == fs.uuid and other.device != fs.device]
    if clones:
        raise DiskError(f"{name} and {', '.join(c.device for c in clones)} carry the same UUID {fs.uuid}: "
                        "one is a clone (dd); unplug it, or give it a new UUID (tune2fs -U random)")
    device_id = os.stat(fs.mountpoint).st_dev
    if device_id == os.stat(manager.archive.data_dir).st_dev:
        raise DiskError(f"{name} holds the internal archive ({manager.archive.data_dir}); adopt an "
                        "external disk")
    if fs.read_only:
        raise DiskError(f"{name} is mounted read-only at {fs.mountpoint}: remount it read-write "
                        f"(mount -o remount,rw {fs.mountpoint}) and adopt it again")
    conn = manager.index.connection()
    known = conn.execute("SELECT role, pair, label FROM disks WHERE uuid = ?", (fs.uuid,)).fetchone()
    if role == "spare":
        pair = 0
    elif known is not None and pair is None and known[0] == role:
        pair = known[1]
    elif pair is None:
        pair = _free_slot(manager, role)
    if known is not None and (known[0], known[1]) != (role, pair):
        raise DiskError(f"{name} (UUID {fs.uuid}) is already adopted here as {known[0]} "
                        + (f"of pair {known[1]}" if known[1] else "") + "; a disk has one place (a clone "
                        "made with dd has the UUID of its original: give it a new one, tune2fs -U random)")
    me = manager.appliance_id
    me_short = me[:8]
    try:
        with DiskTree(fs.mountpoint, device_id, name) as tree:
            marker = identity.read_marker(tree)
    except (UnsafePath, OSError) as exc:
        raise DiskError(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}") from exc
    foreign = marker is not None and (marker.appliance_id != me or marker.uuid != fs.uuid)
    if foreign and known is not None and marker.appliance_id == "" and marker.uuid == fs.uuid:
        foreign = False  # adopted here before markers named their appliance
    if foreign and marker.appliance_id == me:
        raise DiskError(f"{name}'s marker belongs to the disk with UUID {marker.uuid}: it is a copy of "
                        "another of this appliance's disks; give it a new UUID and wipe it before adopting")
    if foreign and force is None:
        owner = marker.appliance_id or "an appliance with older software"
        raise DiskError(f"{name} was adopted by another appliance ({owner}) as {marker.role} of pair "
                        f"{marker.pair}; to take it over (that appliance stops using it): "
                        f"appliance disks adopt {label} --role {role} --force {CONFIRM_WORD}")
    if not replacing and role != "spare":
        holder = conn.execute("SELECT label FROM disks WHERE role = ? AND pair = ? AND uuid != ?",
                              (role, pair, fs.uuid)).fetchone()
        if holder is not None:
            raise DiskError(f"pair {pair} already has a {role} ({holder[0]}); adopt this one as another "
                            f"pair's {role}, or replace a dead disk with `appliance disks rebuild`")
    adopted_at = now_local().isoformat(timespec="seconds")
    try:
        with DiskTree(fs.mountpoint, device_id, name) as tree:
            identity.write_marker(tree, identity.Marker(me, fs.uuid, fs.label, role, pair), adopted_at)
            tree.folder([ROOT, "tmp"], create=True)
            os.fsync(tree.folder([ROOT]))
            os.fsync(tree.root_fd)
            absent = _absent_copies(manager, tree, fs.uuid) if known is not None else []
    except UnsafePath as exc:
        raise DiskError(f"cannot adopt {name}: {exc.strerror}") from exc
    except OSError as exc:
        hint = "it is read-only" if exc.errno == errno.EROFS else "check the disk (full? failing?)"
        raise DiskError(f"cannot write to {name}: {exc.strerror or exc}; {hint}") from exc
    with manager.index.transaction() as tx:
        if absent:  # adopted again after a wipe: rows whose file is gone are no copies
            tx.executemany("DELETE FROM disk_copies WHERE disk_uuid = ? AND path = ?",
                           [(fs.uuid, path) for path in absent])
            log.warning("%s: %d recorded copies are no longer on the disk; they will be made again",
                        name, len(absent))
        if foreign:
            tx.execute("DELETE FROM disk_copies WHERE disk_uuid = ?", (fs.uuid,))
            identity.record_audit(tx, "disk-takeover", fs.uuid, {
                "label": fs.label, "previous_appliance": marker.appliance_id, "previous_role": marker.role,
                "previous_pair": marker.pair, "appliance": me, "role": role, "pair": pair})
        tx.execute("INSERT INTO disks (uuid, label, role, pair, adopted_at, appliance_id) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(uuid) DO UPDATE SET label = excluded.label, "
                   "appliance_id = excluded.appliance_id, health = ''",
                   (fs.uuid, fs.label, role, pair, adopted_at, me))
    log.warning("adopted disk %s (UUID %s) as %s of pair %d for appliance %s", name, fs.uuid, role, pair,
                me_short)
    return Disk(fs.uuid, fs.label, role, pair, fs, device_id)


def _absent_copies(manager: DiskManager, tree: DiskTree, uuid: str) -> list[str]:
    """Recorded copies on this disk whose regular file cannot be found (reached without links)."""
    absent = []
    for (path,) in manager.index.connection().execute("SELECT path FROM disk_copies WHERE disk_uuid = ?",
                                                       (uuid,)).fetchall():
        try:
            os.close(tree.open_file(components(path, ROOT)))
        except OSError:
            absent.append(path)
    return absent


def _free_slot(manager: DiskManager, role: str) -> int:
    taken = {row[0] for row in manager.index.connection().execute(
        "SELECT pair FROM disks WHERE role = ?", (role,))}
    pair = 1
    while pair in taken:
        pair += 1
    return pair
