"""Copying images to one external disk in batches, each copy verified before it is recorded.

Why batches: a USB disk pays for every flush, and flushing each file and its
folder (three flushes per image) made the nightly copy four times slower than
`cp -a`. A batch is written through a temp name and renamed into place, the
whole disk is flushed once with syncfs(2), the batch's cached pages are
dropped, and each file is read back from the disk and compared with the
archive's sha256. Only the copies that pass are returned for recording (the
caller records them in one transaction). The guarantee is the per-file one:
nothing is recorded as copied that is not on the disk, intact. A crash leaves
at worst unrecorded files that the next round overwrites.

A disk pulled out mid-batch (or lazily unmounted) leaves its mount point as an
empty folder of the internal disk: every file opened is checked to be on the
disk's own device (st_dev), so nothing written there is ever counted. Every
folder and file on the disk is reached from its root without following a link
(tree.py): a planted link is an error on the disk, never written through.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.disks.model import ROOT
from appliance.disks.tree import DiskGone, DiskTree, UnsafePath, components

if TYPE_CHECKING:
    from appliance.disks.model import Disk

log = logging.getLogger("appliance.disks")

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
BLOCK = 4096  # what a small file costs on a disk beyond its bytes, roughly: one block of slack


@dataclass(frozen=True)
class CopyItem:
    uid: str
    source: Path
    relative: str  # the same relative path on the disk (under gateway/) as in the archive
    sha256: str
    size: int
    source_tree: DiskTree | None = None  # set when `source` is a path on another disk, under its gateway/


@dataclass
class BatchOutcome:
    verified: list[CopyItem] = field(default_factory=list)
    failed: list[tuple[CopyItem, str]] = field(default_factory=list)  # this image, this reason
    stopped: str = ""  # why the batch ended early (disk gone, full, failing); empty when it ran through
    full: bool = False


class SourceUnreadable(OSError):
    """The image to copy cannot be read (the disk to copy to is not at fault)."""


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc_syncfs()


def flush_disk(disk: Disk) -> None:
    """Write everything cached for this disk's file system to it: data, inodes, folders.

    syncfs(2) reports write-back errors since Linux 5.8, so a disk that failed
    to take a block is noticed here, before anything is read back.
    """
    fd = os.open(disk.filesystem.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _check_device(disk, fd)
        if _SYNCFS is None:
            os.sync()
        elif _SYNCFS(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"flushing {disk.label} failed: {os.strerror(code)}")
    finally:
        os.close(fd)


def _check_device(disk: Disk, fd: int) -> None:
    if os.fstat(fd).st_dev != disk.device_id:
        raise DiskGone(errno.ENODEV, f"{disk.label} is no longer mounted at {disk.filesystem.mountpoint}")


def _disk_present(disk: Disk) -> None:
    try:
        here = os.stat(disk.filesystem.mountpoint).st_dev
    except OSError as exc:
        raise DiskGone(errno.ENODEV, f"{disk.label}: its mount point is gone ({exc})") from exc
    if here != disk.device_id:
        raise DiskGone(errno.ENODEV, f"{disk.label} is no longer mounted at {disk.filesystem.mountpoint}")


def _send_all(source_fd: int, target_fd: int, size: int) -> None:
    """Copy in the kernel (sendfile), falling back to read/write where it is refused."""
    offset = 0
    try:
        while True:
            sent = os.sendfile(target_fd, source_fd, offset, max(size - offset, 1 << 20))
            if sent == 0:
                return
            offset += sent
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
            raise
    os.lseek(source_fd, 0, os.SEEK_SET)
    while chunk := os.read(source_fd, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target_fd, view):]


def _open_source(item: CopyItem) -> int:
    try:
        if item.source_tree is not None:  # a partner disk's copy: reached without links, too
            return item.source_tree.open_file(components(str(item.source), ROOT))
        return os.open(item.source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceUnreadable(exc.errno, f"cannot read {item.source}: {exc.strerror or exc}") from exc


def write_one(disk: Disk, tree: DiskTree, item: CopyItem) -> None:
    """Copy one image to its place on the disk through a temp name; not flushed yet.

    Every folder is reached from the disk's root without following a link
    (tree.py); a link where the copy goes is refused, never replaced.
    """
    _disk_present(disk)
    target = components(item.relative, ROOT)
    if _exists_parent(tree, target):
        tree.refuse_link(target)
    source_fd = _open_source(item)
    try:
        temp = [ROOT, "tmp", f"{os.getpid()}-{threading.get_ident()}.part"]
        try:
            target_fd = tree.open_file(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, create_dirs=True)
        except FileNotFoundError:
            _disk_present(disk)  # the tmp folder vanished with the disk
            raise
        try:
            try:
                _send_all(source_fd, target_fd, item.size)
            except OSError as exc:
                if exc.errno in FULL_ERRNOS or exc.errno == errno.EIO:
                    raise  # the target's fault
                # sendfile names no side: find out which one failed
                try:
                    os.fstat(source_fd)
                    os.pread(source_fd, 1, 0)
                except OSError as source_exc:
                    raise SourceUnreadable(source_exc.errno, f"cannot read {item.source}: {source_exc}") \
                        from exc
                raise
        except BaseException:
            os.close(target_fd)
            tree.unlink(temp)
            raise
        os.close(target_fd)
        tree.replace(temp, target)
    finally:
        os.close(source_fd)


def _exists_parent(tree: DiskTree, parts: list[str]) -> bool:
    """True when the target's folder already exists (reached safely): then its name is checked."""
    try:
        tree.folder(parts[:-1])
    except FileNotFoundError:
        return False
    return True


def read_back(disk: Disk, tree: DiskTree, item: CopyItem) -> bool:
    """True when the copy on the disk, read from the disk itself, has the archive's sha256."""
    parts = components(item.relative, ROOT)
    try:
        fd = tree.open_file(parts)
    except FileNotFoundError:
        _disk_present(disk)
        return False
    try:
        if hasattr(os, "posix_fadvise"):  # clean after the flush: dropping them forces a real read
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with os.fdopen(fd, "rb", closefd=False) as fp:
            good = hashlib.file_digest(fp, "sha256").hexdigest() == item.sha256
    finally:
        os.close(fd)
    if not good:
        tree.unlink(parts)  # never leave a bad copy where a rescan would find it (it is no link)
    return good


def write_batch(disk: Disk, items: Sequence[CopyItem], pause: Callable[[], float] = lambda: 0.0,
                stop: Callable[[], bool] = lambda: False) -> tuple[list[CopyItem], BatchOutcome]:
    """Write `items` to the disk (not yet flushed): the ones written, and how writing went.

    `pause()` is asked after each file how long to rest (receiving comes first);
    `stop()` ends the writing early (the service is asked to stop): what was
    written is still flushed and verified by `verify_batch`, so the work is not lost.
    """
    outcome = BatchOutcome()
    written: list[CopyItem] = []
    try:
        tree = disk.tree()
    except OSError as exc:
        outcome.stopped = str(exc)
        return written, outcome
    with tree:
        _write_all(disk, tree, items, outcome, written, pause, stop)
    return written, outcome


def _write_all(disk: Disk, tree: DiskTree, items: Sequence[CopyItem], outcome: BatchOutcome,
               written: list[CopyItem], pause: Callable[[], float], stop: Callable[[], bool]) -> None:
    for item in items:
        try:
            write_one(disk, tree, item)
        except SourceUnreadable as exc:
            outcome.failed.append((item, str(exc)))
            continue
        except DiskGone as exc:
            outcome.stopped = str(exc)
            break
        except UnsafePath as exc:
            outcome.stopped = exc.strerror or str(exc)
            break
        except OSError as exc:
            outcome.full = exc.errno in FULL_ERRNOS
            outcome.stopped = (f"{disk.label} is full" if outcome.full
                               else f"writing to {disk.label} failed: {exc}")
            break
        written.append(item)
        rest = pause()
        if rest > 0:
            time.sleep(rest)
        if stop():
            break


def verify_batch(disk: Disk, written: Sequence[CopyItem], outcome: BatchOutcome) -> BatchOutcome:
    """Flush the disk, then read each written copy back from it: `outcome.verified` is what passed.

    The flush starts after the batch was written, so it covers the whole
    batch even while the next batch is being written (the two overlap).
    """
    if not written:
        return outcome
    try:
        flush_disk(disk)
    except OSError as exc:
        outcome.stopped = outcome.stopped or str(exc)
        return outcome  # nothing of this batch is known to be on the disk: nothing is recorded
    try:
        tree = disk.tree()
    except OSError as exc:
        outcome.stopped = outcome.stopped or str(exc)
        return outcome
    with tree:
        _read_all(disk, tree, written, outcome)
    return outcome


def _read_all(disk: Disk, tree: DiskTree, written: Sequence[CopyItem], outcome: BatchOutcome) -> None:
    for item in written:
        try:
            good = read_back(disk, tree, item)
        except DiskGone as exc:
            outcome.stopped = outcome.stopped or str(exc)
            break
        except OSError as exc:
            outcome.failed.append((item, f"reading the copy back from {disk.label} failed: {exc}"))
            continue
        if good:
            outcome.verified.append(item)
        else:
            outcome.failed.append((item, f"the copy on {disk.label} does not match its sha256 "
                                         "(damaged source or disk)"))


def copy_batch(disk: Disk, items: Sequence[CopyItem], pause: Callable[[], float] = lambda: 0.0,
               stop: Callable[[], bool] = lambda: False) -> BatchOutcome:
    """Write, flush once, read back: the verified copies of `items` on `disk`."""
    written, outcome = write_batch(disk, items, pause, stop)
    return verify_batch(disk, written, outcome)


def clear_leftovers(disk: Disk) -> None:
    """Remove temp files a crashed copier left on the disk (their process is gone).

    Only regular files in the disk's own gateway/tmp, reached without links: a
    `tmp` that is a link is an error on the disk, and nothing is deleted through it.
    """
    with disk.tree() as tree:
        try:
            entries = list(tree.listing([ROOT, "tmp"]))
        except FileNotFoundError:
            return
        for name, info in entries:
            pid = name.split("-", 1)[0]
            if (name.endswith(".part") and stat.S_ISREG(info.st_mode) and pid.isdigit()
                    and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists()):
                tree.unlink([ROOT, "tmp", name])
