"""Whose disk is this: the appliance's own identity, the marker on a disk, the audit record.

Every appliance has an identity of its own, made once and kept with its data
(`<data_dir>/appliance-id.json`: a random UUID and when it was made). The
marker a disk carries (`.gateway-disk.json` at its root) names that identity,
the disk's file-system UUID, its pair and its role. A disk is written to, and
its copies count for retention, only while its marker says all four match
what the index says: a disk another appliance adopted, a `dd` clone, a
reformatted disk or a wiped one is recognised and left alone.

Taking over a foreign disk is a deliberate act: it is logged at WARNING and
appended to the `audit_events` table of the index (when, what, which disk,
the details as JSON), the first entry of an audit trail other features can
write to as well.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.archive import durable
from appliance.archive.ingest import now_local
from appliance.disks.tree import DiskTree, UnsafePath

log = logging.getLogger("appliance.disks")

IDENTITY_FILE = ".gateway-disk.json"
APPLIANCE_ID_FILE = "appliance-id.json"
MARKER_FORMAT = 2  # 1: {"appliance": "gateway"} on every box; 2: names the appliance's own identity
MAX_MARKER = 64 * 1024


def appliance_id(data_dir: Path) -> str:
    """This appliance's identity: read, or made once (atomically, durably) on first use."""
    path = data_dir / APPLIANCE_ID_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))["appliance_id"]
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(errno.EINVAL, f"{path} is damaged ({exc}); restore it from a backup: it tells this "
                                    "appliance's disks from others'") from exc
    made = {"appliance_id": str(uuid.uuid4()), "created_at": now_local().isoformat(timespec="seconds")}
    data_dir.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as fp:
        fp.write(json.dumps(made, indent=2).encode())
        fp.flush()
        os.fsync(fp.fileno())
    try:
        os.link(temp, path)  # never replaces one made meanwhile by another process
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    durable.fsync_path(data_dir)
    return json.loads(path.read_text(encoding="utf-8"))["appliance_id"]


@dataclass(frozen=True)
class Marker:
    appliance_id: str  # '' on a marker written by software that did not name its appliance
    uuid: str
    label: str
    role: str
    pair: int


def read_marker(tree: DiskTree) -> Marker | None:
    """The marker at the disk's root; None when there is none. A link or garbage raises UnsafePath."""
    try:
        fd = tree.open_file([IDENTITY_FILE])
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, MAX_MARKER)
    finally:
        os.close(fd)
    try:
        fields: dict[str, Any] = json.loads(data)
        return Marker(str(fields.get("appliance_id", "")), str(fields["uuid"]), str(fields.get("label", "")),
                      str(fields["role"]), int(fields["pair"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise UnsafePath(errno.EINVAL, f"the marker {IDENTITY_FILE} on {tree.label} is unreadable ({exc})") \
            from exc


def write_marker(tree: DiskTree, marker: Marker, adopted_at: str) -> None:
    """Write the marker durably at the disk's root (temp name, fsync, rename, fsync the root)."""
    body = json.dumps({"format": MARKER_FORMAT, "appliance_id": marker.appliance_id, "uuid": marker.uuid,
                       "label": marker.label, "role": marker.role, "pair": marker.pair,
                       "adopted_at": adopted_at}, indent=2).encode()
    temp = [f".{IDENTITY_FILE}.{os.getpid()}.tmp"]
    fd = tree.open_file(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    tree.refuse_link([IDENTITY_FILE])
    tree.replace(temp, [IDENTITY_FILE])
    os.fsync(tree.root_fd)


def record_audit(conn: sqlite3.Connection, action: str, subject: str, detail: dict[str, Any]) -> None:
    """Append one event to the audit trail (inside the caller's transaction) and log it at WARNING."""
    text = json.dumps(detail, ensure_ascii=False, sort_keys=True)
    conn.execute("INSERT INTO audit_events (at, action, subject, detail) VALUES (?, ?, ?, ?)",
                 (now_local().isoformat(timespec="seconds"), action, subject, text))
    log.warning("audit: %s %s %s", action, subject, text)
