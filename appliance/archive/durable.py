"""The few file-system moves that make a write survive a power cut.

A file is durable only when its data is fsynced, it has been renamed into
place, and the directory holding the new name is fsynced too; a directory we
created is durable only when its parent is fsynced. These helpers do exactly
that and nothing else, so the ingest code reads as the sequence it is.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

# errno values that mean "the disk cannot take this now": the sender should
# hear 0xA700 (out of resources) and try again later, not a failure.
OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.EIO}


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE_ERRNOS


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(directory: Path) -> None:
    """Create `directory` and any missing parents, fsyncing each new entry's parent."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue  # another thread made it; its creator fsyncs the parent
        fsync_path(new.parent)


def move_durable(source: Path, target: Path, *, sync_source_dir: bool = True) -> None:
    """Rename `source` (already fsynced) to `target` and make the new name durable.

    `sync_source_dir=False` for moves out of the temp area: what matters is
    the new name, and a temp name that survives a crash is removed at start.
    A file moved away from a name somebody relies on (an acknowledged file
    set aside) keeps the default, so the old name cannot come back.
    """
    make_dirs_durable(target.parent)
    os.replace(source, target)
    fsync_path(target.parent)
    if sync_source_dir and source.parent != target.parent:
        fsync_path(source.parent)


def write_durable(target: Path, data: bytes, temp_dir: Path) -> None:
    """Write `data` to `target` through a temp file in `temp_dir` (same file system)."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    # pid first: the start-up cleanup keeps temp files of processes still running.
    temp = temp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.tmp"
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    move_durable(temp, target, sync_source_dir=False)
