"""Quarantine: the bytes of a rejected object kept with the reason, never in the archive.

A field engineer finds what a modality sent that could not be stored (and
why) under `<data_dir>/quarantine/<YYYYMMDD>/`. Peer text in the reason
record is escaped, one line per field, so a calling AE or a file name
holding a newline cannot forge a line of it.
"""

from __future__ import annotations

import logging
import os
import secrets
from contextlib import suppress
from pathlib import Path

from appliance.archive import durable
from appliance.archive.clock import now_local
from appliance.peertext import printable

log = logging.getLogger("appliance.archive")

# Rejected objects bigger than this are refused without keeping their bytes: a 2 GB sparse file that
# starts like DICOM must not fill the disk as 2 GB of real blocks in quarantine.
MAX_BYTES = 256_000_000


def discard(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


def keep(quarantine_dir: Path, temp_dir: Path, temp: Path, reason: str, *, calling_ae: str = "",
         source: str = "", max_bytes: int | None = None) -> Path | None:
    """Move `temp` to `<quarantine_dir>/<YYYYMMDD>/<time>-<id>.dcm`, the reason in a .txt beside it.

    Returns the kept path, or None when nothing was kept (over `max_bytes`, or
    even the quarantine cannot be written: the bytes are dropped with an ERROR).
    """
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    size = temp.stat().st_size if temp.exists() else 0
    if size > max_bytes:
        discard(temp)
        log.warning("rejected object (%s); %s bytes, over the quarantine limit of %s: not kept",
                    reason, f"{size:,}", f"{max_bytes:,}")
        return None
    stamp = now_local()
    folder = quarantine_dir / stamp.strftime("%Y%m%d")
    name = f"{stamp.strftime('%H%M%S-%f')}-{secrets.token_hex(3)}"
    target = folder / f"{name}.dcm"
    try:
        durable.make_dirs_durable(folder)
        durable.write_durable(
            folder / f"{name}.txt",
            (
                # One line per field: a calling AE or a file name holding a newline
                # must not forge a line of this record.
                f"reason: {printable(reason, 1024)}\ncalling_ae: {printable(calling_ae)}\n"
                f"source: {printable(source, 1024)}\n"
                f"received_at: {stamp.isoformat(timespec='seconds')}\n"
            ).encode("utf-8", "replace"),
            temp_dir,
        )
        with open(temp, "rb") as fp:
            os.fsync(fp.fileno())
        durable.move_durable(temp, target)
    except OSError as exc:
        log.error("cannot quarantine %s (%s): %s", source or temp, reason, exc)
        discard(temp)
        return None
    log.warning("rejected object (%s); bytes kept in %s", reason, target)
    return target
