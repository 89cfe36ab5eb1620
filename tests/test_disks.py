"""External disks on real file systems: ext4 images on loop devices (the tests run as root)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from appliance import config
from appliance.archive import open_archive
from appliance.disks.manager import DiskManager
from tests.conftest import run_cli, synthetic_ct, write_config

pytestmark = pytest.mark.root  # loop devices: run as root, or deselect with -m 'not root'


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.fixture
def usb(loop_disks):
    """usb(label, mb) -> mount point of a fresh ext4 disk with that label."""
    return lambda label, mb=40: loop_disks(label, mb, label=label)


@pytest.fixture
def gateway(tmp_path: Path):
    path = write_config(tmp_path / "a.toml", {"data_dir": str(tmp_path / "data"), "min_free_mb": 1})
    with open(path, "a") as fp:
        fp.write('\n[disks]\ncopy_window = "always"\nspool_days = 30\nmin_free_gb = 0.005\npause_ms = 0\n')
    return path


def _import(config_path: Path, tmp_path: Path, count: int, name: str = "ct", size: int = 128) -> None:
    files = synthetic_ct(tmp_path / name, count, size=size, patient_id=name.upper())
    result = run_cli(config_path, "import", *map(str, files))
    assert f"imported {count}" in result.stdout


def _status(config_path: Path) -> list[dict]:
    return json.loads(run_cli(config_path, "disks", "status", "--json").stdout)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adopt_copy_and_status(gateway: Path, usb, tmp_path: Path) -> None:
    a, b, stranger = usb("GW_A"), usb("GW_B"), usb("SOMEONES")
    adopted = run_cli(gateway, "disks", "adopt", "GW_A", "--role", "primary").stdout
    assert "adopted as primary of pair 1" in adopted
    adopted = run_cli(gateway, "disks", "adopt", "GW_B", "--role", "mirror").stdout
    assert "adopted as mirror of pair 1" in adopted
    missing = run_cli(gateway, "disks", "adopt", "NOPE", "--role", "primary", check=False)
    assert missing.returncode == 2 and "no mounted file system has the label" in missing.stderr
    _import(gateway, tmp_path, 12)
    assert "24 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    rows = {r["label"]: r for r in _status(gateway)}
    for label in ("GW_A", "GW_B"):
        row = rows[label]
        assert row["mounted"] and row["pair"] == 1 and row["instances"] == 12
        assert row["total_bytes"] > row["free_bytes"] > 0
    assert {rows["GW_A"]["role"], rows["GW_B"]["role"]} == {"primary", "mirror"}
    # The copies are the archive's bytes, on both disks; the stranger's disk is untouched.
    archive = tmp_path / "data"
    for spool in (archive / "archive").rglob("*.dcm"):
        relative = spool.relative_to(archive)
        assert _sha(a / "gateway" / relative) == _sha(b / "gateway" / relative) == _sha(spool)
    assert sorted(p.name for p in stranger.iterdir()) == ["lost+found"]


def test_spool_leaves_only_with_two_verified_copies_and_age(gateway: Path, usb, tmp_path: Path) -> None:
    usb("GW_A")
    run_cli(gateway, "disks", "adopt", "GW_A", "--role", "primary")
    _import(gateway, tmp_path, 5)
    settings = config.load(gateway)
    manager = DiskManager(open_archive(settings), settings.disks)
    later = dt.datetime.now().astimezone() + dt.timedelta(days=31)
    assert manager.copy_round() == 5
    assert manager.purge_spool(now=later) == 0, "one copy is not enough, whatever the age"
    usb("GW_B")
    run_cli(gateway, "disks", "adopt", "GW_B", "--role", "mirror")
    assert manager.copy_round() == 5
    assert manager.purge_spool() == 0, "two copies, but not old enough yet"
    assert manager.purge_spool(now=later) == 5
    assert list((tmp_path / "data" / "archive").rglob("*.dcm")) == []


def test_verify_finds_and_repairs_a_flipped_byte(gateway: Path, usb, tmp_path: Path) -> None:
    usb("GW_A")
    b = usb("GW_B")
    run_cli(gateway, "disks", "adopt", "GW_A", "--role", "primary")
    run_cli(gateway, "disks", "adopt", "GW_B", "--role", "mirror")
    _import(gateway, tmp_path, 4)
    run_cli(gateway, "disks", "copy")
    victim = next((b / "gateway").rglob("*.dcm"))
    good = _sha(victim)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = json.loads(run_cli(gateway, "disks", "verify", "GW_B", "--json").stdout)
    assert report["repaired"] == 1 and report["good"] == 3 and report["unrepairable"] == 0
    assert _sha(victim) == good
    again = json.loads(run_cli(gateway, "disks", "verify", "--json").stdout)
    assert again["good"] == 8 and again["repaired"] == 0


def test_missing_mirror_degrades_then_catches_up(gateway: Path, usb, tmp_path: Path) -> None:
    usb("GW_A")
    b = usb("GW_B")
    run_cli(gateway, "disks", "adopt", "GW_A", "--role", "primary")
    run_cli(gateway, "disks", "adopt", "GW_B", "--role", "mirror")
    assert _run("umount", "-l", str(b)).returncode == 0  # unplugged
    _import(gateway, tmp_path, 6)
    assert "6 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    text = run_cli(gateway, "disks", "status").stdout
    assert "NOT MOUNTED" in text and "pair 1 is degraded" in text
    rows = {r["label"]: r for r in _status(gateway)}
    assert rows["GW_B"]["mounted"] is False and rows["GW_A"]["instances"] == 6
    image = next(tmp_path.glob("GW_B.img"))
    assert _run("mount", "-o", "loop", str(image), str(b)).returncode == 0  # plugged back
    assert "6 verified copies made" in run_cli(gateway, "disks", "copy").stdout
    assert {r["instances"] for r in _status(gateway)} == {6}


def test_full_pair_rotates_to_the_next(gateway: Path, usb, tmp_path: Path) -> None:
    for label, role in (("P1_A", "primary"), ("P1_B", "mirror")):
        usb(label, mb=8)
        run_cli(gateway, "disks", "adopt", label, "--role", role)
    for label, role in (("P2_A", "primary"), ("P2_B", "mirror")):
        usb(label, mb=40)
        run_cli(gateway, "disks", "adopt", label, "--role", role)
    _import(gateway, tmp_path, 40, size=256)  # 40 x 131 KB: more than pair 1 holds above 5 MB free
    for _ in range(5):
        run_cli(gateway, "disks", "copy")
    rows = {r["label"]: r for r in _status(gateway)}
    first, second = rows["P1_A"]["instances"], rows["P2_A"]["instances"]
    assert first > 0 and second > 0, "pair 1 filled, pair 2 took over"
    assert first + second == 40, "no image lost or duplicated across pairs"
    assert rows["P1_B"]["instances"] == first and rows["P2_B"]["instances"] == second
    assert rows["P2_A"]["active"] and not rows["P1_A"]["active"]
    assert "pair 2 is the last one" in run_cli(gateway, "disks", "status").stdout
    assert shutil.disk_usage(tmp_path / "mnt-P1_A").free >= 0


def test_blank_replacement_is_rebuilt_from_the_survivor(gateway: Path, usb, tmp_path: Path) -> None:
    usb("GW_A")
    b = usb("GW_B")
    run_cli(gateway, "disks", "adopt", "GW_A", "--role", "primary")
    run_cli(gateway, "disks", "adopt", "GW_B", "--role", "mirror")
    _import(gateway, tmp_path, 7)
    run_cli(gateway, "disks", "copy")
    assert _run("umount", "-l", str(b)).returncode == 0  # GW_B died
    c = usb("GW_C")  # a blank replacement
    result = run_cli(gateway, "disks", "rebuild", "GW_C", "--from", "GW_A")
    assert "7 copied and verified, 0 failed" in result.stdout
    rows = {r["label"]: r for r in _status(gateway)}
    assert "GW_B" not in rows, "the dead disk is dropped from the index"
    assert rows["GW_C"]["role"] == "mirror" and rows["GW_C"]["pair"] == 1 and rows["GW_C"]["instances"] == 7
    for copy in (tmp_path / "mnt-GW_A" / "gateway" / "archive").rglob("*.dcm"):
        twin = c / "gateway" / copy.relative_to(tmp_path / "mnt-GW_A" / "gateway")
        assert _sha(twin) == _sha(copy)
    assert json.loads(run_cli(gateway, "disks", "verify", "--json").stdout)["good"] == 14


def test_rescan_of_an_old_gateway_disk_rebuilds_the_index(gateway: Path, usb, tmp_path: Path) -> None:
    old = usb("OLDGW")
    files = synthetic_ct(tmp_path / "old", 6, size=64, patient_id="OLD1")
    for n, source in enumerate(files):  # the old PC's layout: E:\\20240105\\CR-12345\\IMG0001
        folder = old / "20240105" / "CT-OLD1"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / f"IMG{n:04d}")
    (old / "20240105" / "readme.txt").write_text("backup of the gateway PC")
    (old / "20240105" / "CT-OLD1" / "BROKEN").write_bytes(files[0].read_bytes()[:3000])
    run_cli(gateway, "disks", "adopt", "OLDGW", "--role", "spare")
    report = json.loads(run_cli(gateway, "disks", "rescan", "OLDGW", "--json").stdout)
    assert report == {"found": 6, "already_known": 0, "known_other_content": 0, "unreadable": 1,
                      "not_dicom": 1, "links": 0}
    found = json.loads("[" + ",".join(run_cli(gateway, "find", "--json", "--patient-id", "OLD1")
                                      .stdout.split("\n")[:-1]) + "]")
    assert len(found) == 6
    again = json.loads(run_cli(gateway, "disks", "rescan", "OLDGW", "--json").stdout)
    assert again["found"] == 0 and again["already_known"] == 6
    assert json.loads(run_cli(gateway, "disks", "verify", "OLDGW", "--json").stdout)["good"] == 6


def test_disk_unmounted_mid_copy_records_nothing_false(gateway: Path, usb, tmp_path: Path) -> None:
    import threading

    usb("GW_A")
    b = usb("GW_B")
    run_cli(gateway, "disks", "adopt", "GW_A", "--role", "primary")
    run_cli(gateway, "disks", "adopt", "GW_B", "--role", "mirror")
    _import(gateway, tmp_path, 40)
    settings = config.load(gateway)
    slow = settings.disks.__class__(**{**settings.disks.__dict__, "pause_ms": 50.0})
    manager = DiskManager(open_archive(settings), slow, batch_files=5)
    manager.receiving = lambda: True  # as if images were arriving: 50 ms between files
    worker = threading.Thread(target=manager.copy_round)
    worker.start()
    deadline = time.monotonic() + 30
    while len(list(b.rglob("*.dcm"))) < 12:  # two batches of five verified, the third under way
        assert time.monotonic() < deadline and worker.is_alive(), "the copy never reached GW_B"
        time.sleep(0.02)
    assert _run("umount", "-l", str(b)).returncode == 0  # pulled out mid-copy
    worker.join(60)
    assert not list(b.rglob("*.dcm")), "nothing may land on the internal disk's empty mount point"
    image = tmp_path / "GW_B.img"
    assert _run("mount", "-o", "loop", str(image), str(b)).returncode == 0
    index = sqlite3.connect(tmp_path / "data" / "index.sqlite")
    recorded = index.execute(
        "SELECT c.path, c.sha256 FROM disk_copies c JOIN disks d ON d.uuid = c.disk_uuid "
        "WHERE d.label = 'GW_B'").fetchall()
    assert 0 < len(recorded) < 40, "the unplug landed mid-copy"
    assert len(recorded) % 5 == 0, "a batch is recorded whole once verified, or not at all"
    for relative, sha in recorded:  # every recorded copy is really on the disk, intact
        assert _sha(b / "gateway" / relative) == sha
    run_cli(gateway, "disks", "copy")
    assert {r["instances"] for r in _status(gateway)} == {40}


def test_copy_window() -> None:
    from appliance.disks.window import in_window, parse_window

    evening = dt.datetime(2026, 11, 23, 20, 30)
    morning = dt.datetime(2026, 11, 24, 7, 0)
    assert in_window("19:00-23:59", evening) and not in_window("19:00-23:59", morning)
    assert in_window("22:00-06:00", dt.datetime(2026, 11, 24, 2, 0)), "a window may wrap midnight"
    assert not in_window("22:00-06:00", dt.datetime(2026, 11, 24, 12, 0))
    assert in_window("always", morning) and parse_window("ALWAYS") is None
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        parse_window("7pm-midnight")


def test_nearly_full_internal_disk_raises_an_alert(tmp_path: Path, usb) -> None:
    internal = usb("INTERNAL", mb=20)
    path = write_config(tmp_path / "i.toml", {"data_dir": str(internal / "data"), "min_free_mb": 0})
    with open(path, "a") as fp:
        fp.write('\n[disks]\ncopy_window = "always"\n')
    _import(path, tmp_path, 3)
    with open(internal / "filler", "wb") as fp:  # leave under 10 % free
        fp.truncate(0)
        total, free = shutil.disk_usage(internal).total, shutil.disk_usage(internal).free
        fp.write(b"\0" * int(free - 0.05 * total))
    text = run_cli(path, "disks", "status").stdout
    assert "internal disk nearly full" in text and "3 image(s) lack two verified external copies" in text


def test_status_page_shows_capacity_rotation_and_asks_for_new_disks(usb, tmp_path: Path) -> None:
    import signal
    import sys

    from tests.conftest import REPO, free_port
    from tests.web_helpers import browse, visible_text, web_service

    port = free_port()
    path = write_config(tmp_path / "web.toml", {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
                        web_port=port)
    with open(path, "a") as fp:
        fp.write('\n[disks]\ncopy_window = "always"\nmin_free_gb = 0.005\npause_ms = 0\n')
    for label, role, mb in (("P1_A", "primary", 8), ("P1_B", "mirror", 8), ("P2_A", "primary", 12),
                            ("P2_B", "mirror", 12)):
        usb(label, mb=mb)
        run_cli(path, "disks", "adopt", label, "--role", role)
    _import(path, tmp_path, 30, size=256)
    service = subprocess.Popen([sys.executable, "-m", "appliance", "--config", str(path), "disks"],
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        state = tmp_path / "data" / "run" / "disks.json"
        deadline = time.monotonic() + 60
        while True:  # the service fills pair 1, rotates, and publishes what it did
            published = json.loads(state.read_text()) if state.exists() else {}
            disks = {d["label"]: d for d in published.get("disks", [])}
            if disks and disks["P1_A"]["instances"] + disks["P2_A"]["instances"] == 30:
                break
            assert time.monotonic() < deadline and service.poll() is None, published
            time.sleep(0.2)
        with web_service(path, port, tmp_path / "web.log"):
            dom = browse(port)
        page = visible_text(dom)
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 0, service.stderr.read()
    assert "Needs attention" in page
    assert "pair 1 full or absent: copies now go to pair 2" in page
    assert "pair 2 is the last one: adopt new disks before it fills" in page
    for label in ("P1_A", "P1_B", "P2_A", "P2_B"):
        assert f'data-label="{label}"' in dom
    row = visible_text(dom.split('data-label="P2_A"', 1)[1].split("</tr>", 1)[0])
    assert "primary, pair 2 active" in row and "MB free of" in row, row
    assert f"{disks['P2_A']['instances']} " in row
