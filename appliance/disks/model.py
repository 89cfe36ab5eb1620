"""An adopted disk as the manager sees it at one moment: where it is, whether it may be trusted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.disks.devices import Filesystem
from appliance.disks.tree import DiskTree

ROOT = "gateway"  # everything the appliance writes on a disk lives under this folder
ROLES = ("primary", "mirror", "spare")


class DiskError(Exception):
    """A disk command cannot be done; the message says why and what to do."""


@dataclass
class Disk:
    uuid: str
    label: str
    role: str
    pair: int
    filesystem: Filesystem | None  # None when not mounted (unplugged, dead)
    device_id: int = 0  # st_dev of the mount point when found: tells a vanished disk apart
    problem: str = ""  # why this mounted disk is not trusted (marker, link, clone); '' when it is
    health: str = ""  # the last write error, '' once a write went well

    @property
    def mounted(self) -> bool:
        return self.filesystem is not None

    @property
    def trusted(self) -> bool:
        """Mounted, ours by its marker, its folder reachable without links: copies on it count."""
        return self.filesystem is not None and not self.problem

    @property
    def read_only(self) -> bool:
        return self.filesystem is not None and self.filesystem.read_only

    @property
    def writable(self) -> bool:
        return self.trusted and not self.read_only

    @property
    def root(self) -> Path:
        assert self.filesystem is not None
        return self.filesystem.mountpoint / ROOT

    def tree(self) -> DiskTree:
        """Descriptors on this disk reached without links (see tree.py); close it after use."""
        assert self.filesystem is not None
        return DiskTree(self.filesystem.mountpoint, self.device_id, self.label)

    def state(self, active: bool = False) -> str:
        """One word for the status: what a field engineer looks at first."""
        if not self.mounted:
            return "missing"
        if self.problem:
            return "untrusted"
        if self.read_only:
            return "read-only"
        if self.health:
            return "failing"
        return "active" if active else "ready"
