"""The same proofs on xfs, the other file system a clinic's USB disk may carry.

xfs refuses file systems under 300 MB, so the images are 300 MB sparse files
(a few MB really written). The cases: a re-sent image gets copies of its
own, a patient folder linked out of the disk is never written through (a
sentinel folder stays untouched), a mirror remounted read-only shows as
such, and retention 40 days later loses nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_disk_links import make_sentinel, snapshot
from tests.test_disk_proof import (
    import_images,
    make_gateway,
    resend_changed,
    retention_loses_nothing,
    sh,
    status,
)

pytestmark = pytest.mark.root  # loop devices: run as root, or deselect with -m 'not root'


@pytest.fixture
def xfs_disk(tmp_path: Path):
    made: list[Path] = []

    def make(label: str) -> Path:
        assert shutil.which("mkfs.xfs"), "mkfs.xfs is missing: make test installs xfsprogs"
        image, mount = tmp_path / f"{label}.img", tmp_path / f"mnt-{label}"
        with open(image, "wb") as fp:
            fp.truncate(300 * 1024 * 1024)
        sh("mkfs.xfs", "-q", "-L", label, str(image))
        mount.mkdir()
        sh("mount", "-o", "loop", str(image), str(mount))
        made.append(mount)
        return mount

    yield make
    for mount in made:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60)


def test_on_xfs_versions_links_and_a_read_only_mirror(xfs_disk, tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path)
    a, b = xfs_disk("XFS_A"), xfs_disk("XFS_B")
    run_cli(gateway, "disks", "adopt", "XFS_A", "--role", "primary")
    run_cli(gateway, "disks", "adopt", "XFS_B", "--role", "mirror")
    files = import_images(gateway, tmp_path, 3)
    assert "6 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    assert "replaced 1" in run_cli(gateway, "import", str(resend_changed(files[1], tmp_path / "v2"))).stdout
    assert "2 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    sentinel = make_sentinel(tmp_path)
    before = snapshot(sentinel)
    (b / "gateway" / "archive" / "20261123" / "CT-NEW").symlink_to(sentinel)
    import_images(gateway, tmp_path, 2, name="new")
    assert "2 verified copies made" in run_cli(gateway, "disks", "copy").stdout  # XFS_A only
    assert snapshot(sentinel) == before
    row = status(gateway)["XFS_B"]
    assert row["state"] == "failing" and "symbolic link" in row["health"], row
    sh("mount", "-o", "remount,ro", str(b))
    assert status(gateway)["XFS_B"]["state"] == "read-only"
    assert retention_loses_nothing(gateway, [a, b]) == 3, "read-only still proves; the linked ones stay"
    assert snapshot(sentinel) == before
