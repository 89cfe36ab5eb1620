"""`appliance disks rescan LABEL`: rebuild the index from what is on a disk.

For a disk the index lost track of, or one written by an older gateway PC
(DICOM files in dated folders, any names, any depth): every DICOM file is
read with the same completeness check and header reader as the archive's
door. A file whose instance is unknown gets index rows and a verified copy
row pointing at the disk (the image is not in the internal spool); a known
instance with the same bytes becomes a recorded copy; anything else is
reported, never deleted. Nothing is read through a link or from another
device: a link to a file outside the disk is counted under "links", not as a copy.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator

from appliance.archive import layout
from appliance.archive.ingest import now_local
from appliance.archive.record import UnreadableObject, read_record
from appliance.disks.manager import IDENTITY_FILE, DiskManager
from appliance.disks.model import ROOT, Disk, DiskError

log = logging.getLogger("appliance.disks")


def _dicom_files(disk: Disk, root_fd: int, tally: Counter) -> Iterator[tuple[str, int]]:
    """(path from the disk's root, open descriptor) of each regular file on the disk's own file
    system, folders walked and files opened without following links; links are counted, not read."""
    for folder, dirs, files, dir_fd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False):
        keep = []
        for name in sorted(dirs):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                tally["links"] += 1
                log.warning("rescan: %s on %s is a symbolic link: not followed",
                            os.path.normpath(os.path.join(folder, name)), disk.label)
            elif info.st_dev == disk.device_id and name not in ("lost+found", "tmp"):
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            relative = os.path.normpath(os.path.join(folder, name))
            if name in (IDENTITY_FILE, "DICOMDIR") or name.upper() == "DICOMDIR":
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    tally["links"] += 1
                    log.warning("rescan: %s on %s is a symbolic link: not followed", relative, disk.label)
                else:
                    tally["unreadable"] += 1
                continue
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_dev != disk.device_id:
                os.close(fd)
                tally["not_dicom"] += 1
                continue
            yield relative, fd


def rescan(manager: DiskManager, label: str) -> Counter:
    disk = next((d for d in manager.disks() if label in (d.label, d.uuid)), None)
    if disk is None or not disk.mounted:
        raise DiskError(f"{label!r} is not an adopted, mounted disk: adopt it first "
                        "(`appliance disks adopt LABEL --role spare` for an old archive disk)")
    if disk.problem:
        raise DiskError(f"{disk.label} cannot be rescanned: {disk.problem}")
    tally: Counter = Counter()
    index = manager.index
    with disk.tree() as tree:
        for relative, fd in _dicom_files(disk, tree.root_fd, tally):
            try:
                with os.fdopen(fd, "rb") as fp:
                    if fp.read(132)[128:132] != b"DICM":
                        tally["not_dicom"] += 1
                        continue
                    size = os.fstat(fp.fileno()).st_size
                    fp.seek(0)
                    record, _walk = read_record(fp, size, f"{disk.label}:{relative}")
                    fp.seek(0)
                    sha = hashlib.file_digest(fp, "sha256").hexdigest()
            except (UnreadableObject, OSError) as exc:
                log.warning("rescan: %s", exc)
                tally["unreadable"] += 1
                continue
            # Copies are recorded relative to the disk's gateway folder; an old
            # gateway's files elsewhere on the disk get a "../" path.
            on_disk = os.path.relpath(relative, ROOT)
            known = index.stored_file(record.sop_instance_uid)
            stamp = now_local().isoformat(timespec="milliseconds")
            with index.transaction() as conn:
                if known is None:
                    archive_path = "archive/" + str(layout.instance_path(
                        study_date=record.study_date, modality=record.modality,
                        patient_id=record.patient_id, sop_instance_uid=record.sop_instance_uid,
                        received=now_local()))
                    index.upsert_instance(conn, record, path=archive_path, size=size, sha256=sha,
                                          dataset_sha256="", calling_ae="", source=f"rescan {disk.label}",
                                          received_at=stamp)
                    conn.execute("UPDATE instances SET spool_purged_at = ? WHERE sop_instance_uid = ?",
                                 (stamp, record.sop_instance_uid))
                    tally["found"] += 1
                elif known["sha256"] == sha:
                    tally["already_known"] += 1
                else:
                    tally["known_other_content"] += 1
                    continue
                conn.execute("INSERT OR REPLACE INTO disk_copies (sop_instance_uid, disk_uuid, path, sha256, "
                             "verified_at) VALUES (?, ?, ?, ?, ?)",
                             (record.sop_instance_uid, disk.uuid, on_disk, sha, stamp))
    return tally
