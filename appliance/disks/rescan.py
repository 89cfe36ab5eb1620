"""`appliance disks rescan LABEL`: rebuild the index from what is on a disk.

For a disk the index lost track of, or one written by an older gateway PC
(DICOM files in dated folders, any names, any depth): every DICOM file is
read with the same completeness check and header reader as the archive's
door. A file whose instance is unknown gets index rows and a verified copy
row pointing at the disk (the image is not in the internal spool); a known
instance with the same bytes becomes a recorded copy; anything else is
reported, never deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from pathlib import Path

from appliance.archive import layout
from appliance.archive.ingest import now_local
from appliance.archive.record import UnreadableObject, read_record
from appliance.disks.manager import IDENTITY_FILE, DiskError, DiskManager

log = logging.getLogger("appliance.disks")


def rescan(manager: DiskManager, label: str) -> Counter:
    disk = next((d for d in manager.disks() if label in (d.label, d.uuid)), None)
    if disk is None or not disk.mounted:
        raise DiskError(f"{label!r} is not an adopted, mounted disk: adopt it first "
                        "(`appliance disks adopt LABEL --role spare` for an old archive disk)")
    mount = disk.filesystem.mountpoint
    tally: Counter = Counter()
    index = manager.index
    for folder, dirs, files in os.walk(mount):
        dirs[:] = sorted(d for d in dirs if d not in ("lost+found", "tmp"))
        for name in sorted(files):
            path = Path(folder) / name
            if name == IDENTITY_FILE or name.upper() == "DICOMDIR":
                continue
            try:
                with open(path, "rb") as fp:
                    if fp.read(132)[128:132] != b"DICM":
                        tally["not_dicom"] += 1
                        continue
                    size = path.stat().st_size
                    record, _walk = read_record(fp, size, str(path))
                    fp.seek(0)
                    sha = hashlib.file_digest(fp, "sha256").hexdigest()
            except (UnreadableObject, OSError) as exc:
                log.warning("rescan: %s", exc)
                tally["unreadable"] += 1
                continue
            # Copies are recorded relative to the disk's gateway folder; an old
            # gateway's files elsewhere on the disk get a "../" path.
            on_disk = os.path.relpath(path, disk.root)
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
