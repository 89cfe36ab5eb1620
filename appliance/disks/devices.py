"""Which file systems are mounted, and what their labels and UUIDs are.

Disks are known by file-system label or UUID, never by /dev name: /dev/sdb
today is /dev/sdc after the next reboot. `blkid` probes the device itself,
so this works with or without udev (loop-mounted images in the tests have
no /dev/disk/by-label, and lsblk shows no labels without udev).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DISK_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "exfat", "vfat", "ntfs", "ntfs3", "fuseblk"}


@dataclass(frozen=True)
class Filesystem:
    device: str
    mountpoint: Path
    fstype: str
    label: str
    uuid: str
    read_only: bool = False  # mounted "ro": its copies can still be proven, nothing is written


def _unescape(field: str) -> str:
    """/proc/mounts writes spaces and friends as octal escapes (\\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def probe(device: str) -> dict[str, str]:
    """LABEL, UUID, TYPE of a block device, read from the device itself."""
    try:
        result = subprocess.run(["blkid", "-o", "export", "-p", device], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def mounted() -> list[Filesystem]:
    """Every mounted block-device file system of a kind a USB disk may carry."""
    found = []
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            device, mountpoint, fstype, options, *_ = line.split()
            if not device.startswith("/dev/") or fstype not in DISK_FILESYSTEMS:
                continue
            if any(fs.device == device for fs in found):
                continue  # one file system mounted twice (a bind mount): it is one disk
            info = probe(device)
            found.append(Filesystem(device, Path(_unescape(mountpoint)), fstype,
                                    info.get("LABEL", ""), info.get("UUID", ""),
                                    "ro" in options.split(",")))
    return found


def capacity(mountpoint: Path) -> tuple[int, int]:
    """(total, free) bytes."""
    usage = shutil.disk_usage(mountpoint)
    return usage.total, usage.free
