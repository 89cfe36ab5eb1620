"""Nothing follows a link out of a disk: a link planted at every level of a disk's tree.

A sentinel folder outside the disk stands in for `/` (or the partner disk):
whatever the copier, verify, retention or rescan do, nothing in it is
created, changed or deleted, the disk shows the link in its status, and
retention 40 days later loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, synthetic_ct
from tests.test_disk_proof import (
    data_dir,
    import_images,
    make_gateway,
    nothing_lost,
    pair,
    retention_loses_nothing,
    status,
)

pytestmark = pytest.mark.root  # loop devices: run as root, or deselect with -m 'not root'

@pytest.fixture
def gateway(tmp_path: Path) -> Path:
    return make_gateway(tmp_path)


@pytest.fixture
def usb(loop_disks):
    return lambda label, mb=40: loop_disks(label, mb, label=label)


STALE_PART = "999999-1.part"  # a temp name of a process that no longer exists


def snapshot(folder: Path) -> list[tuple[str, str]]:
    """Every entry under `folder` (links not followed) with its kind and content."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found.append((str(path.relative_to(folder)), "link " + os.readlink(path)))
        elif path.is_dir():
            found.append((str(path.relative_to(folder)), "dir"))
        else:
            found.append((str(path.relative_to(folder)), hashlib.sha256(path.read_bytes()).hexdigest()))
    return found


def make_sentinel(tmp_path: Path) -> Path:
    sentinel = tmp_path / "sentinel"  # stands in for `/`: the copier must never touch it
    (sentinel / "tmp").mkdir(parents=True)
    (sentinel / "tmp" / STALE_PART).write_bytes(b"not ours")
    (sentinel / "etc").mkdir()
    (sentinel / "etc" / "passwd").write_text("root:x:0:0")
    return sentinel


LEVELS = ("gateway", "dated folder", "patient folder", "tmp")


@pytest.mark.parametrize("level", LEVELS)
def test_a_link_in_the_tree_is_never_written_through(level: str, gateway: Path, usb, tmp_path: Path) -> None:
    a, b = pair(gateway, usb)
    import_images(gateway, tmp_path, 4)
    sentinel = make_sentinel(tmp_path)
    before = snapshot(sentinel)
    date, patient = b / "gateway" / "archive" / "20261123", b / "gateway" / "archive" / "20261123" / "CT-CT"
    planted = {"gateway": b / "gateway", "dated folder": date, "patient folder": patient,
               "tmp": b / "gateway" / "tmp"}[level]
    if planted.exists():
        shutil.rmtree(planted)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(sentinel)
    copy = run_cli(gateway, "disks", "copy")
    assert "4 verified copies made" in copy.stdout, "GW_A gets its copies, GW_B none"
    assert "Traceback" not in copy.stderr
    assert snapshot(sentinel) == before, "nothing outside the disk is created, changed or deleted"
    row = status(gateway)["GW_B"]
    assert row["state"] in ("untrusted", "failing") and "symbolic link" in row["health"], row
    assert row["instances"] == 0
    text = run_cli(gateway, "disks", "status").stdout
    assert "symbolic link" in text and "WARNING: disk GW_B" in text
    assert retention_loses_nothing(gateway, [a, b]) == 0, "one genuine copy only: everything stays"
    assert snapshot(sentinel) == before
    verify = run_cli(gateway, "disks", "verify", "--json", check=False)
    assert verify.returncode == 0 or "symbolic link" in verify.stderr
    assert snapshot(sentinel) == before


def test_a_copy_replaced_by_a_link_to_the_internal_file(gateway: Path, usb, tmp_path: Path) -> None:
    a, b = pair(gateway, usb)
    import_images(gateway, tmp_path, 4)
    run_cli(gateway, "disks", "copy")
    data = data_dir(gateway)
    victim = next((b / "gateway").rglob("*.dcm"))
    internal = data / victim.relative_to(b / "gateway")
    victim.unlink()
    victim.symlink_to(internal)  # "verifies" through the link, dangles after retention
    internal_before = snapshot(data / "archive")
    result = run_cli(gateway, "disks", "verify", "GW_B", "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["links"] == 1 and report["good"] == 3, report
    assert "symbolic link" in result.stderr and victim.name in result.stderr
    assert victim.is_symlink(), "the link is reported, not followed, not replaced"
    assert snapshot(data / "archive") == internal_before
    # The copier does not write through it either; the disk is failing until the link goes.
    run_cli(gateway, "disks", "copy")
    row = status(gateway)["GW_B"]
    assert row["state"] == "failing" and "symbolic link" in row["health"]
    assert retention_loses_nothing(gateway, [a, b]) == 3, "the linked image stays; the others are proven"
    assert internal.is_file()
    victim.unlink()
    assert "1 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    assert status(gateway)["GW_B"]["state"] == "active"
    assert retention_loses_nothing(gateway, [a, b]) == 1
    assert nothing_lost(gateway, [a, b]) == 4


def test_rescan_never_records_a_link_as_a_copy(gateway: Path, usb, tmp_path: Path) -> None:
    old = usb("OLDGW")
    outside = synthetic_ct(tmp_path / "outside", 3, size=32, patient_id="OUT")
    mine = synthetic_ct(tmp_path / "mine", 2, size=32, patient_id="MINE")
    folder = old / "20240105" / "CT-MINE"
    folder.mkdir(parents=True)
    for n, source in enumerate(mine):
        shutil.copy(source, folder / f"IMG{n:04d}")
    (folder / "IMG9999").symlink_to(outside[0])  # a file outside the disk
    (old / "20240106").symlink_to(outside[0].parent)  # a folder outside the disk
    run_cli(gateway, "disks", "adopt", "OLDGW", "--role", "spare")
    report = json.loads(run_cli(gateway, "disks", "rescan", "OLDGW", "--json").stdout)
    assert report["found"] == 2 and report["links"] == 2, report
    assert run_cli(gateway, "find", "--json", "--patient-id", "OUT").stdout == ""
