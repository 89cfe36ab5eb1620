"""Disk identity: another appliance's disk, a dd clone, a disk in two places, one label on two
disks, a read-only disk. Each refusal is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_disk_proof import (
    data_dir,
    import_images,
    make_gateway,
    manager,
    pair,
    retention_loses_nothing,
    sh,
    status,
)

pytestmark = pytest.mark.root  # loop devices: run as root, or deselect with -m 'not root'


@pytest.fixture
def usb(loop_disks):
    return lambda label, mb=40, name=None: loop_disks(name or label, mb, label=label)


def refused(config: Path, *args: str, saying: str) -> str:
    result = run_cli(config, *args, check=False)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert saying in result.stderr, result.stderr
    return result.stderr


def disk_files(mount: Path) -> int:
    return len(list((mount / "gateway").rglob("*.dcm")))


def test_another_appliances_disk_is_refused_and_taken_over_only_with_the_word(tmp_path: Path, usb) -> None:
    one, two = make_gateway(tmp_path, "one"), make_gateway(tmp_path, "two")
    a, b = pair(one, usb)
    import_images(one, tmp_path, 3)
    run_cli(one, "disks", "copy")
    marker = (b / ".gateway-disk.json").read_text()
    refused(two, "disks", "adopt", "GW_B", "--role", "primary", saying="adopted by another appliance")
    one_id = json.loads((data_dir(one) / "appliance-id.json").read_text())["appliance_id"]
    assert json.loads(marker)["appliance_id"] == one_id, "the marker names the appliance's own identity"
    refused(two, "disks", "adopt", "GW_B", "--role", "primary", "--force", "yes",
            saying="--force takeover")
    assert (b / ".gateway-disk.json").read_text() == marker, "a refused adoption leaves the marker alone"
    taken = run_cli(two, "disks", "adopt", "GW_B", "--role", "primary", "--force", "takeover")
    assert "adopted as primary of pair 1" in taken.stdout and "audit: disk-takeover" in taken.stderr
    two_id = json.loads((data_dir(two) / "appliance-id.json").read_text())["appliance_id"]
    assert two_id != one_id and json.loads((b / ".gateway-disk.json").read_text())["appliance_id"] == two_id
    events = sqlite3.connect(data_dir(two) / "index.sqlite").execute(
        "SELECT action, subject, detail FROM audit_events").fetchall()
    assert len(events) == 1 and events[0][0] == "disk-takeover"
    assert json.loads(events[0][2])["previous_appliance"] == one_id
    # The first appliance sees it is no longer its disk: not written, not counted.
    row = status(one)["GW_B"]
    assert row["state"] == "untrusted" and "another appliance" in row["health"]
    held = disk_files(b)
    import_images(one, tmp_path, 2, name="later")
    assert "2 verified copies made" in run_cli(one, "disks", "copy").stdout  # GW_A only
    assert disk_files(b) == held
    assert manager(one).purge_spool(now=None) == 0
    assert retention_loses_nothing(one, [a]) == 0, "one disk of its own: nothing leaves appliance one"


def test_clones_second_places_and_twin_labels_are_refused(tmp_path: Path, usb) -> None:
    gw = make_gateway(tmp_path)
    a, b = pair(gw, usb)
    c, d = pair(gw, usb, "GW_C", "GW_D")
    import_images(gw, tmp_path, 3)
    run_cli(gw, "disks", "copy")
    uuid = status(gw)["GW_A"]["uuid"]
    sh("sync")
    clone_image, clone = tmp_path / "clone.img", tmp_path / "mnt-clone"
    sh("cp", str(tmp_path / "GW_A.img"), str(clone_image))  # dd of our primary
    clone.mkdir()
    sh("mount", "-o", "loop", str(clone_image), str(clone))
    try:
        refused(gw, "disks", "adopt", uuid, "--role", "mirror", saying="one is a clone")
        refused(gw, "disks", "adopt", "GW_A", "--role", "mirror", saying="carry the UUID")
        row = status(gw)["GW_A"]
        assert row["state"] == "untrusted" and "clone" in row["health"], row
        assert "0 verified copies made" in run_cli(gw, "disks", "copy").stdout
    finally:
        subprocess.run(["umount", str(clone)], capture_output=True, timeout=60)
        for line in subprocess.run(["losetup", "-j", str(clone_image)], capture_output=True, text=True,
                                   timeout=60).stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True, timeout=60)
    assert status(gw)["GW_A"]["state"] == "active"
    refused(gw, "disks", "adopt", "GW_A", "--role", "spare",
            saying="already adopted here as primary of pair 1")
    refused(gw, "disks", "adopt", "GW_C", "--role", "mirror", "--pair", "1",
            saying="already adopted here as primary of pair 2")
    sh("umount", str(b))  # GW_B dies; rebuilding onto pair 2's mirror is refused
    refused(gw, "disks", "rebuild", "GW_D", "--from", "GW_A",
            saying="already adopted here as mirror of pair 2")
    rows = status(gw)
    assert (rows["GW_D"]["role"], rows["GW_D"]["pair"]) == ("mirror", 2) and "GW_B" in rows
    read_only = usb("GW_F")
    sh("mount", "-o", "remount,ro", str(read_only))
    refused(gw, "disks", "rebuild", "GW_F", "--from", "GW_A", saying="mounted read-only")
    # A new disk may take a taken place only through rebuild.
    usb("GW_E")
    refused(gw, "disks", "adopt", "GW_E", "--role", "mirror", "--pair", "1",
            saying="pair 1 already has a mirror (GW_B)")
    # Two mounted disks with one label: adopt by UUID.
    usb("TWIN", name="twin1")
    usb("TWIN", name="twin2")
    said = refused(gw, "disks", "adopt", "TWIN", "--role", "spare",
                   saying="2 mounted disks are labelled 'TWIN'")
    assert said.count("UUID") >= 2
    sh("mount", "-o", "loop", str(tmp_path / "GW_B.img"), str(b))
    assert retention_loses_nothing(gw, [a, b, c, d]) == 3


def test_a_read_only_disk_is_refused_with_one_line(tmp_path: Path, usb) -> None:
    gw = make_gateway(tmp_path)
    disk = usb("RO_DISK")
    sh("mount", "-o", "remount,ro", str(disk))
    refused(gw, "disks", "adopt", "RO_DISK", "--role", "primary", saying="mounted read-only")
    assert not (disk / ".gateway-disk.json").exists()


def test_disks_adopted_by_the_previous_software_are_kept_and_claimed(tmp_path: Path, usb) -> None:
    """Schema 5 (copies keyed by instance and disk, markers without an appliance identity)
    upgrades in place: the copies stay recorded, the disks stay trusted, and the next copy
    writes this appliance's identity into their markers."""
    gw = make_gateway(tmp_path)
    a, b = pair(gw, usb)
    import_images(gw, tmp_path, 2)
    run_cli(gw, "disks", "copy")
    index = sqlite3.connect(data_dir(gw) / "index.sqlite")
    index.executescript("""
        CREATE TABLE old_copies (sop_instance_uid TEXT NOT NULL, disk_uuid TEXT NOT NULL, path TEXT NOT NULL,
            sha256 TEXT NOT NULL, verified_at TEXT NOT NULL, PRIMARY KEY (sop_instance_uid, disk_uuid));
        INSERT INTO old_copies SELECT sop_instance_uid, disk_uuid, path, sha256, verified_at FROM disk_copies;
        DROP TABLE disk_copies;
        ALTER TABLE old_copies RENAME TO disk_copies;
        CREATE INDEX disk_copies_disk ON disk_copies(disk_uuid);
        ALTER TABLE disks DROP COLUMN appliance_id;
        ALTER TABLE disks DROP COLUMN health;
        ALTER TABLE disks DROP COLUMN health_at;
        DROP TABLE audit_events;
        DROP TABLE patient_names;
        ALTER TABLE instances DROP COLUMN patient_name;
        PRAGMA user_version = 5;
    """)
    index.close()
    for mount in (a, b):
        marker = json.loads((mount / ".gateway-disk.json").read_text())
        for key in ("appliance_id", "format"):
            del marker[key]
        marker["appliance"] = "gateway"
        (mount / ".gateway-disk.json").write_text(json.dumps(marker))
    (data_dir(gw) / "appliance-id.json").unlink()
    rows = status(gw)
    assert [(rows[k]["state"], rows[k]["instances"]) for k in ("GW_A", "GW_B")] == [("active", 2)] * 2
    import_images(gw, tmp_path, 1, name="after")
    assert "2 verified copies made" in run_cli(gw, "disks", "copy").stdout
    me = json.loads((data_dir(gw) / "appliance-id.json").read_text())["appliance_id"]
    assert all(json.loads((m / ".gateway-disk.json").read_text())["appliance_id"] == me for m in (a, b))
    assert retention_loses_nothing(gw, [a, b]) == 3
