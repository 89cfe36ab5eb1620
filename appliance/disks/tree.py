"""Opening paths on an external disk without ever leaving it.

A disk comes from outside the box: anyone may have planted a symbolic link
in it (`gateway/` pointing at `/`, a patient folder pointing at the partner
disk, a copy replaced by a link to the internal file) or mounted something
else inside it. Every path on a disk is therefore walked one component at a
time from a descriptor of the disk's root: each folder and file is opened
relative to its parent with O_NOFOLLOW (a link is refused by the kernel, not
by a check that could race) and its `st_dev` must be the disk's own device.
Creating, renaming and deleting go through the parent's descriptor, so
nothing is ever written or deleted through a link or on another device.

Walking costs one openat(2) per component; folder descriptors are kept for
the life of a `DiskTree` (a batch), so a batch of files in one patient folder
pays for the walk once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Iterator

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(OSError):
    """A link or another device on the way: the disk is not written or read through it."""


class DiskGone(OSError):
    """The disk is no longer where it was mounted: nothing more may be written or counted."""


def components(relative: str, base: str) -> list[str]:
    """The components of `base/relative` below the disk's root, refusing anything that climbs out.

    Copies are recorded relative to the disk's `base` folder; an old gateway's
    files elsewhere on the disk are recorded as "../…" and stay inside the disk.
    """
    joined = posixpath.normpath(posixpath.join(base, relative))
    parts = joined.split("/")
    if joined.startswith("/") or not parts or parts[0] in ("..", ".", ""):
        raise UnsafePath(errno.EPERM, f"{relative!r} is not a path inside the disk")
    return parts


class DiskTree:
    """Descriptors of folders on one disk, each reached without following a link."""

    def __init__(self, mountpoint: os.PathLike | str, device_id: int, label: str) -> None:
        self.label = label
        self.device_id = device_id
        try:
            self.root_fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskGone(errno.ENODEV, f"{label}: its mount point {mountpoint} is gone ({exc})") from exc
        self._dirs: dict[tuple[str, ...], int] = {(): self.root_fd}
        try:
            self._check(self.root_fd, str(mountpoint), gone=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def __enter__(self) -> DiskTree:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _check(self, fd: int, where: str, gone: bool = False) -> os.stat_result:
        info = os.fstat(fd)
        if info.st_dev != self.device_id:
            if gone:
                raise DiskGone(errno.ENODEV, f"{self.label} is no longer mounted at {where}")
            raise UnsafePath(errno.EXDEV, f"{where} on {self.label} is on another device "
                                          "(something is mounted inside the disk)")
        return info

    def _link_error(self, parent: int, name: str, where: str, exc: OSError) -> OSError:
        """ELOOP/ENOTDIR from an O_NOFOLLOW open: say whether a link was found."""
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except OSError:
            return exc
        if stat.S_ISLNK(info.st_mode):
            return UnsafePath(errno.ELOOP, f"{where} on {self.label} is a symbolic link; the gateway never "
                                           "follows links on a disk: remove it")
        return UnsafePath(errno.ENOTDIR, f"{where} on {self.label} is not a folder")

    def folder(self, parts: list[str] | tuple[str, ...], create: bool = False) -> int:
        """Descriptor of the folder `parts` (from the disk's root); made when `create`."""
        key = tuple(parts)
        if key in self._dirs:
            return self._dirs[key]
        parent = self.folder(key[:-1], create)
        name, where = key[-1], "/".join(key)
        try:
            fd = os.open(name, O_DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):  # made meanwhile, or a dangling link: see below
                os.mkdir(name, 0o755, dir_fd=parent)
            try:
                fd = os.open(name, O_DIR, dir_fd=parent)
            except OSError as exc:
                raise self._link_error(parent, name, where, exc) from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._link_error(parent, name, where, exc) from exc
            raise
        try:
            self._check(fd, where)
        except BaseException:
            os.close(fd)
            raise
        self._dirs[key] = fd
        return fd

    def open_file(self, parts: list[str], flags: int = os.O_RDONLY, mode: int = 0o644,
                  create_dirs: bool = False) -> int:
        """A file's descriptor, opened without following a link, checked to be on the disk."""
        parent = self.folder(parts[:-1], create_dirs)
        where = "/".join(parts)
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._link_error(parent, parts[-1], where, exc) from exc
            raise
        try:
            info = self._check(fd, where)
            if not stat.S_ISREG(info.st_mode):
                raise UnsafePath(errno.EINVAL, f"{where} on {self.label} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def entry(self, parts: list[str]) -> os.stat_result:
        """lstat of a path's last component (its folders walked safely); FileNotFoundError if absent."""
        return os.stat(parts[-1], dir_fd=self.folder(parts[:-1]), follow_symlinks=False)

    def refuse_link(self, parts: list[str]) -> None:
        """Raise UnsafePath when the last component exists and is a link (never replaced or deleted)."""
        try:
            info = self.entry(parts)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            raise UnsafePath(errno.ELOOP, f"{'/'.join(parts)} on {self.label} is a symbolic link; the "
                                          "gateway never follows links on a disk: remove it")

    def unlink(self, parts: list[str]) -> None:
        """Remove a regular file (never a link: the caller checked) in its safely opened folder."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(parts[-1], dir_fd=self.folder(parts[:-1]))

    def replace(self, source: list[str], target: list[str], create_dirs: bool = True) -> None:
        """Rename `source` over `target`, both in folders reached without links."""
        os.replace(source[-1], target[-1], src_dir_fd=self.folder(source[:-1]),
                   dst_dir_fd=self.folder(target[:-1], create_dirs))

    def listing(self, parts: list[str]) -> Iterator[tuple[str, os.stat_result]]:
        """Names in a folder with their lstat (links reported as links, never followed)."""
        fd = self.folder(parts)
        for name in os.listdir(fd):
            try:
                yield name, os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
