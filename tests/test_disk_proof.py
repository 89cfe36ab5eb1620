"""External disks that never lie: each way an index row could be wrong, on ext4 loop disks.

Every case ends with retention run 40 days later (a fake clock) and the
check that nothing was lost: each image's indexed version (its sha256) is
still in the internal file, or in regular files on two distinct genuine
disks, reached without any link. The helpers here are shared with
test_disk_links.py and test_disk_identity.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pydicom
import pytest

from appliance import config
from appliance.archive import open_archive
from appliance.disks.manager import DiskManager
from tests.conftest import run_cli, synthetic_ct, write_config

pytestmark = pytest.mark.root  # loop devices: run as root, or deselect with -m 'not root'

LATER = dt.timedelta(days=40)  # past spool_days (30): retention may remove what is proven


def sh(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"


def make_gateway(tmp_path: Path, name: str = "a", **disks: object) -> Path:
    path = write_config(tmp_path / f"{name}.toml", {"data_dir": str(tmp_path / f"data-{name}"),
                                                    "min_free_mb": 1})
    keys = {"copy_window": '"always"', "spool_days": 30, "min_free_gb": 0.005, "pause_ms": 0,
            **{k: (f'"{v}"' if isinstance(v, str) else v) for k, v in disks.items()}}
    with open(path, "a") as fp:
        fp.write("\n[disks]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    return path


@pytest.fixture
def gateway(tmp_path: Path) -> Path:
    return make_gateway(tmp_path)


@pytest.fixture
def usb(loop_disks):
    """usb(label, mb) -> mount point of a fresh ext4 disk with that label."""
    return lambda label, mb=40, name=None: loop_disks(name or label, mb, label=label)


def manager(config_path: Path) -> DiskManager:
    settings = config.load(config_path)
    return DiskManager(open_archive(settings), settings.disks)


def data_dir(config_path: Path) -> Path:
    return config.load(config_path).data_dir


def import_images(config_path: Path, tmp_path: Path, count: int, name: str = "ct",
                  size: int = 64) -> list[Path]:
    files = synthetic_ct(tmp_path / name, count, size=size, patient_id=name.upper())
    result = run_cli(config_path, "import", *map(str, files))
    assert f"imported {count}" in result.stdout
    return files


def pair(config_path: Path, usb, a: str = "GW_A", b: str = "GW_B", mb: int = 40) -> tuple[Path, Path]:
    first, second = usb(a, mb), usb(b, mb)
    run_cli(config_path, "disks", "adopt", a, "--role", "primary")
    run_cli(config_path, "disks", "adopt", b, "--role", "mirror")
    return first, second


def status(config_path: Path) -> dict[str, dict]:
    return {r["label"]: r for r in json.loads(run_cli(config_path, "disks", "status", "--json").stdout)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def genuine_file(mount: Path, relative: Path) -> Path | None:
    """The file at `relative` under the disk, when every component is a real folder/file on the
    disk's own device (no link anywhere); None otherwise."""
    device = os.lstat(mount).st_dev
    current = mount
    for part in relative.parts:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode) or info.st_dev != device:
            return None
    return current if stat.S_ISREG(os.lstat(current).st_mode) else None


def nothing_lost(config_path: Path, disks: list[Path]) -> int:
    """Every indexed version is in its internal file or on two genuine disks; returns how many
    images live on the disks only."""
    data = data_dir(config_path)
    index = sqlite3.connect(data / "index.sqlite")
    outside = 0
    for uid, relative, digest in index.execute("SELECT sop_instance_uid, path, sha256 FROM instances"):
        internal = data / relative
        if internal.is_file() and not internal.is_symlink() and sha(internal) == digest:
            continue
        holders = set()
        for mount in disks:
            found = genuine_file(mount, Path("gateway") / relative)
            if found is not None and sha(found) == digest:
                holders.add(os.lstat(mount).st_dev)
        assert len(holders) >= 2, f"{uid} ({relative}): its indexed version is on {len(holders)} disk(s)"
        outside += 1
    index.close()
    return outside


def retention_loses_nothing(config_path: Path, disks: list[Path]) -> int:
    """Run retention 40 days later (a fake clock); assert nothing was lost; images removed."""
    removed = manager(config_path).purge_spool(now=dt.datetime.now().astimezone() + LATER)
    nothing_lost(config_path, disks)
    return removed


def resend_changed(source: Path, target_dir: Path) -> Path:
    """The same SOP instance with new pixel values: a modality's corrected image."""
    ds = pydicom.dcmread(source)
    pixels = bytearray(ds.PixelData)
    pixels[:64] = bytes(64)
    ds.PixelData = bytes(pixels)
    target_dir.mkdir(parents=True, exist_ok=True)
    ds.save_as(target_dir / source.name, enforce_file_format=True)
    return target_dir / source.name


# --- the table: every way the index's word was wrong -------------------------------------------


def test_a_resent_version_gets_copies_of_its_own(gateway: Path, usb, tmp_path: Path) -> None:
    a, b = pair(gateway, usb)
    files = import_images(gateway, tmp_path, 3)
    assert "6 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    corrected = resend_changed(files[0], tmp_path / "corrected")
    assert "replaced 1" in run_cli(gateway, "import", str(corrected)).stdout
    assert "2 verified copies made" in run_cli(gateway, "disks", "copy").stdout, \
        "the new version needs copies of its own"
    assert retention_loses_nothing(gateway, [a, b]) == 3
    uid = pydicom.dcmread(corrected).SOPInstanceUID
    found = run_cli(gateway, "find", "--json", "--patient-id", "CT").stdout.splitlines()
    indexed = next(r for r in map(json.loads, found) if r["sop_instance_uid"] == uid)
    assert indexed["sha256"] == sha(corrected), "the index points to the corrected version"
    # Retention removed the internal file: `find` says so, and names the disks and paths that
    # hold the corrected version instead of pointing at a file that is gone.
    assert not Path(indexed["path"]).exists() and indexed["on_internal_disk"] is False
    assert sorted(c["label"] for c in indexed["disk_copies"]) == ["GW_A", "GW_B"]
    for copy in indexed["disk_copies"]:
        disk = {"GW_A": a, "GW_B": b}[copy["label"]]
        assert sha(disk / copy["path"]) == indexed["sha256"]
    assert "on disks GW_A, GW_B" in run_cli(gateway, "find", "--patient-id", "CT").stdout
    assert json.loads(run_cli(gateway, "disks", "verify", "--json").stdout)["unrepairable"] == 0


def test_a_mirror_wiped_while_mounted_does_not_count(gateway: Path, usb, tmp_path: Path) -> None:
    a, b = pair(gateway, usb)
    import_images(gateway, tmp_path, 5)
    run_cli(gateway, "disks", "copy")
    (b / ".gateway-disk.json").unlink()
    shutil.rmtree(b / "gateway")
    row = status(gateway)["GW_B"]
    assert row["mounted"] and row["state"] == "untrusted" and "marker" in row["health"]
    assert retention_loses_nothing(gateway, [a, b]) == 0, "one disk holds them: nothing may leave"
    assert "UNTRUSTED" in run_cli(gateway, "disks", "status").stdout
    said = list(manager(gateway).warnings(now=dt.datetime.now().astimezone() + LATER))
    assert ("5 image(s) older than spool_days wait on the internal disk for a second proven copy "
            "(0 have none); not counted: GW_B (missing or untrusted)") in said, said
    # Adopting it again in its place brings it back; the copies are made again, then retention may act.
    run_cli(gateway, "disks", "adopt", "GW_B", "--role", "mirror")
    assert "5 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    assert retention_loses_nothing(gateway, [a, b]) == 5


def test_a_gateway_folder_linked_to_the_partner_is_no_second_copy(gateway: Path, usb,
                                                                  tmp_path: Path) -> None:
    a, b = pair(gateway, usb)
    import_images(gateway, tmp_path, 4)
    run_cli(gateway, "disks", "copy")
    shutil.rmtree(b / "gateway")
    (b / "gateway").symlink_to(a / "gateway")
    result = run_cli(gateway, "disks", "verify", "GW_B", "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["good"] == 0 and report["links"] >= 1
    assert "symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert status(gateway)["GW_B"]["state"] == "untrusted"
    assert retention_loses_nothing(gateway, [a, b]) == 0


def test_a_stale_proof_is_read_again_before_deleting(gateway: Path, usb, tmp_path: Path) -> None:
    a, b = pair(gateway, usb)
    import_images(gateway, tmp_path, 3)
    run_cli(gateway, "disks", "copy")
    victim = next((b / "gateway").rglob("*.dcm"))
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF  # damaged after its verification: the row still says "verified"
    victim.write_bytes(bytes(data))
    assert retention_loses_nothing(gateway, [a, b]) == 2, "the damaged copy is no proof"


def test_read_only_mirror_and_a_failing_write_show_in_disks_status(gateway: Path, usb,
                                                                   tmp_path: Path) -> None:
    a, b = pair(gateway, usb)
    import_images(gateway, tmp_path, 3)
    sh("mount", "-o", "remount,ro", str(b))
    copy = run_cli(gateway, "disks", "copy")
    assert "3 verified copies made" in copy.stdout and "ERROR" not in copy.stderr
    row = status(gateway)["GW_B"]
    assert row["state"] == "read-only" and "remount" in row["health"]
    text = run_cli(gateway, "disks", "status").stdout
    assert "READ-ONLY" in text and "WARNING: disk GW_B (mirror, pair 1) read-only" in text
    assert "pair 1 is degraded" in text
    sh("mount", "-o", "remount,rw", str(b))
    assert "3 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    assert status(gateway)["GW_B"]["state"] == "active"
    # A write that fails on the disk itself (a folder where a copy must go) marks it failing ...
    files = import_images(gateway, tmp_path, 2, name="more")
    found = json.loads(run_cli(gateway, "find", "--json", "--patient-id", "MORE").stdout.splitlines()[0])
    in_the_way = b / "gateway" / Path(found["path"]).relative_to(data_dir(gateway))
    in_the_way.mkdir(parents=True)
    run_cli(gateway, "disks", "copy")
    row = status(gateway)["GW_B"]
    assert row["state"] == "failing" and "GW_B" in row["health"], row
    assert "FAILING" in run_cli(gateway, "disks", "status").stdout
    # ... until a write succeeds again.
    in_the_way.rmdir()
    run_cli(gateway, "disks", "copy")
    assert status(gateway)["GW_B"]["state"] == "active" and len(files) == 2
    assert retention_loses_nothing(gateway, [a, b]) == 5


def test_rotation_when_the_next_image_does_not_fit_above_the_floor(gateway: Path, usb,
                                                                  tmp_path: Path) -> None:
    # 16 MB disks, a 5 MB floor, 8 MB images: after one image 6 MB are left, above the floor
    # but too little for the next image.
    p1 = pair(gateway, usb, "P1_A", "P1_B", mb=16)
    import_images(gateway, tmp_path, 3, size=2000)
    first = run_cli(gateway, "disks", "copy")
    assert "2 verified copies made" in first.stdout
    text = run_cli(gateway, "disks", "status").stdout
    assert "every disk pair is full or absent: 2 image(s) lack two copies" in text
    assert {r["state"] for r in status(gateway).values()} == {"full"}
    p2 = pair(gateway, usb, "P2_A", "P2_B", mb=40)
    second = run_cli(gateway, "disks", "copy")
    assert "4 verified copies made" in second.stdout
    assert second.stderr.count("copies now go to pair 2") <= 1
    rows = status(gateway)
    assert [rows[k]["instances"] for k in ("P1_A", "P1_B", "P2_A", "P2_B")] == [1, 1, 2, 2]
    assert rows["P2_A"]["active"] and not rows["P1_A"]["active"]
    assert retention_loses_nothing(gateway, [*p1, *p2]) == 3


def _published(path: Path) -> dict[str, dict]:
    state = data_dir(path) / "run" / "disks.json"
    return {d["label"]: d for d in (json.loads(state.read_text()) if state.exists() else {}).get("disks", [])}


def test_the_service_rotates_once_and_shows_a_read_only_disk_everywhere(tmp_path: Path, usb) -> None:
    """The service: rotation said once; a disk remounted read-only shows in `appliance status`,
    the page and /metrics within a round, and clears once it is writable again."""
    import signal
    import sys
    import time
    import urllib.request

    from tests.conftest import REPO, free_port, wait_for
    from tests.web_helpers import web_service

    port = free_port()
    path = make_gateway(tmp_path, round_seconds=0.5)
    text = path.read_text().replace("enabled = false", f'port = {port}\nbind_address = "127.0.0.1"', 1)
    path.write_text(text)
    p1 = pair(path, usb, "P1_A", "P1_B", mb=16)
    p2 = pair(path, usb, "P2_A", "P2_B", mb=40)
    import_images(path, tmp_path, 3, size=2000)
    log = tmp_path / "disks.log"
    with open(log, "w") as out:
        service = subprocess.Popen([sys.executable, "-m", "appliance", "--config", str(path), "disks"],
                                   cwd=REPO, stderr=out, stdout=out)
    try:
        wait_for(lambda: _published(path).get("P2_B", {}).get("instances") == 2, 60, "rotation to pair 2")
        time.sleep(2)  # a few more rounds: the rotation is not said again
        sh("mount", "-o", "remount,ro", str(p2[1]))
        wait_for(lambda: _published(path)["P2_B"]["state"] == "read-only", 10, "the read-only state")
        report = run_cli(path, "status", check=False).stdout
        assert "disk P2_B" in report and "READ-ONLY" in report, report
        with web_service(path, port, tmp_path / "web.log"):
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'data-label="P2_B"' in page and "READ-ONLY" in page.split('data-label="P2_B"', 1)[1]
        assert 'appliance_external_disk_healthy{label="P2_B",pair="2",role="mirror",state="read-only"} 0.0' \
            in metrics, metrics
        sh("mount", "-o", "remount,rw", str(p2[1]))
        wait_for(lambda: _published(path)["P2_B"]["state"] == "active", 10, "the disk writable again")
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 0, log.read_text()
    text = log.read_text()
    assert text.count("rotating") == 0 and text.count("copies now go to pair 2") == 1, text
    nothing_lost(path, [*p1, *p2])
