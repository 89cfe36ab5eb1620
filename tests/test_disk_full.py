"""Disk full: a real ext4 image on a loop device is the data_dir, and it fills up.

While the disk cannot take an image the sender must hear 0xA700 (Refused: out
of resources, "retry later") on an association that stays up, never an abort
and never a success for an image that is not safely stored; the service stays
up (C-ECHO, `appliance status`) and stores again by itself once space is freed.
Three ways of being full are covered:

- free space under the configured reserve [node] min_free_mb (the archive's
  own check refuses before anything is written into the tree);
- the disk completely full with min_free_mb = 0: writing the received data
  to the spool file fails with ENOSPC;
- min_free_mb = 0 and space freed a few KB at a time across the boundary
  where the spool file fits but the archive's own writes (a new folder, the
  SQLite index) may not: every answer is then success with the image indexed
  and intact, or 0xA700 with nothing left behind.

Two more checks: `appliance status` still calls the receiver running after the
disk has been full for longer than its heartbeat staleness limit, and an image
that leaves the reserve intact once stored is not refused.

After recovery the SQLite index passes `PRAGMA integrity_check`, and the
archive tree holds exactly the indexed files (no partial file anywhere).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import ApplianceProcess, dataset_bytes, dcmtk_env, echo, synthetic_ct

pytestmark = pytest.mark.root  # loop devices: run as root, or deselect with -m 'not root'

IMAGE_MB = 40
SIZE = 256  # 256x256 16-bit CT: ~131 KB per image

SENDING_FILE = re.compile(r"Sending file: (?P<file>.+)$")
DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x(?P<code>[0-9a-fA-F]{4})")


# --- the small disk ------------------------------------------------------------------


@pytest.fixture
def small_disk(loop_disks) -> Path:
    """A 40 MB ext4 file system (no reserved blocks) mounted on a loop device."""
    return loop_disks("disk", IMAGE_MB)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Filler:
    """Files that take the disk's free space, and give it back."""

    def __init__(self, mount: Path) -> None:
        self.path = mount / "filler.bin"
        self.mount = mount

    def leave(self, free: int) -> None:
        """Grow the filler until only about `free` bytes stay free (0: until ENOSPC)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for chunk in (1 << 20, 64 << 10, 4 << 10, 1 << 10):
                block = b"\xa5" * chunk
                while not free or free_bytes(self.mount) - free >= chunk:
                    try:
                        os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)

    def give_back(self, amount: int) -> None:
        """Free `amount` bytes by shortening the filler."""
        size = self.path.stat().st_size
        os.truncate(self.path, max(0, size - amount))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# --- storescu with the status of each store ------------------------------------------


def store(port: int, files: list[Path]) -> tuple[dict[Path, int], str]:
    """Send `files` over one association (-nh: go on after a refusal); status per file."""
    result = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "GATEWAY", "-d", "-nh", "127.0.0.1", str(port),
         *[str(f) for f in files]],
        env=dcmtk_env(), capture_output=True, text=True, timeout=120,
    )
    output = result.stderr + result.stdout
    statuses: dict[Path, int] = {}
    current: Path | None = None
    for line in output.splitlines():
        if m := SENDING_FILE.search(line):
            current = Path(m["file"])
        elif (m := DIMSE_STATUS.search(line)) and current is not None:
            statuses[current] = int(m["code"], 16)
            current = None
    errors = [line for line in output.splitlines() if line.startswith(("E:", "F:"))]
    assert result.returncode == 0 and not errors, f"storescu failed:\n{output[-4000:]}"
    assert "Releasing Association" in output and "Abort" not in output, (
        f"the association did not end with a release:\n{output[-4000:]}"
    )
    assert set(statuses) == set(files), f"no response for some files:\n{output[-4000:]}"
    return statuses, output


def assert_all(statuses: dict[Path, int], code: int, output: str) -> None:
    wrong = {p.name: f"0x{s:04X}" for p, s in statuses.items() if s != code}
    assert not wrong, f"expected 0x{code:04X} for every image, got {wrong}\n{output[-3000:]}"


# --- checks ------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def assert_service_up(proc: ApplianceProcess) -> dict:
    """The process lives, answers C-ECHO, and `appliance status --json` works."""
    assert proc.process is not None and proc.process.poll() is None, f"service died:\n{proc.log()}"
    assert echo(proc.port) == 0, f"no C-ECHO answer:\n{proc.log()}"
    result = proc.cli("status", "--json", check=False)
    assert result.stdout.strip(), f"`appliance status --json` printed nothing:\n{result.stderr}"
    report = json.loads(result.stdout)
    dicom = next(s for s in report["services"] if s["service"] == "dicom")
    assert dicom["state"] == "running", report
    return report


def assert_archive_consistent(proc: ApplianceProcess, sent: list[Path]) -> list[dict]:
    """Index, archive tree and temp dir agree; each indexed image is intact and one we sent."""
    found = proc.find()
    by_uid = {_uid(path): dataset_bytes(path) for path in sent}
    for entry in found:
        path = Path(entry["path"])
        assert path.is_file(), f"indexed file {path} is missing"
        assert sha256_of(path) == entry["sha256"], f"{path}: sha256 differs from the index"
        assert dataset_bytes(path) == by_uid[entry["sop_instance_uid"]], f"{path}: not what was sent"
    tree = {p for p in (proc.data_dir / "archive").rglob("*") if p.is_file()}
    assert tree == {Path(e["path"]) for e in found}, "files in the archive tree the index does not know"
    leftovers = list((proc.data_dir / "tmp").iterdir())
    assert leftovers == [], f"temp files left behind: {leftovers}"
    conn = sqlite3.connect(proc.data_dir / "index.sqlite", timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    return found


def quick_check(data_dir: Path) -> set[str]:
    """A fast assert_archive_consistent straight on the index: the indexed UIDs."""
    conn = sqlite3.connect(data_dir / "index.sqlite", timeout=30)
    try:
        rows = conn.execute("SELECT sop_instance_uid, path, sha256 FROM instances").fetchall()
    finally:
        conn.close()
    for _, path, digest in rows:
        assert sha256_of(data_dir / path) == digest, f"{path}: sha256 differs from the index"
    tree = {p for p in (data_dir / "archive").rglob("*") if p.is_file()}
    assert tree == {data_dir / path for _, path, _ in rows}, "files in the tree the index does not know"
    leftovers = list((data_dir / "tmp").iterdir())
    assert leftovers == [], f"temp files left behind: {leftovers}"
    return {uid for uid, _, _ in rows}


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def uids(paths: list[Path]) -> set[str]:
    return {_uid(p) for p in paths}


# --- the tests ---------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return synthetic_ct(tmp_path / "images", 6, size=SIZE, patient_id="FULL-0001")


def test_below_reserve_refused_with_a700_then_stored_after_space_freed(
    small_disk: Path, make_appliance, images: list[Path]
) -> None:
    reserve_mb = 10
    proc: ApplianceProcess = make_appliance(data_dir=small_disk, min_free_mb=reserve_mb)
    first, refused = images[:1], images[1:4]
    statuses, output = store(proc.port, first)
    assert_all(statuses, 0x0000, output)

    filler = Filler(small_disk)
    # Free space stays above the reserve, but not by one more image.
    filler.leave(reserve_mb * 1_000_000 + first[0].stat().st_size // 2)
    assert free_bytes(small_disk) > reserve_mb * 1_000_000
    statuses, output = store(proc.port, refused)
    assert_all(statuses, 0xA700, output)
    report = assert_service_up(proc)
    assert report["disk"]["free_bytes"] < report["disk"]["min_free_bytes"] + first[0].stat().st_size
    assert uids(refused).isdisjoint(e["sop_instance_uid"] for e in proc.find())
    assert_archive_consistent(proc, images)

    filler.remove()
    statuses, output = store(proc.port, refused)
    assert_all(statuses, 0x0000, output)
    found = assert_archive_consistent(proc, images)
    assert {e["sop_instance_uid"] for e in found} == uids(first + refused)
    assert_service_up(proc)


def test_full_disk_refused_with_a700_then_stored_after_space_freed(
    small_disk: Path, make_appliance, images: list[Path]
) -> None:
    proc: ApplianceProcess = make_appliance(data_dir=small_disk, min_free_mb=0)
    first, refused = images[:1], images[1:4]
    statuses, output = store(proc.port, first)
    assert_all(statuses, 0x0000, output)

    filler = Filler(small_disk)
    filler.leave(0)
    assert free_bytes(small_disk) < 64 * 1024, "the disk did not fill up"
    statuses, output = store(proc.port, refused)
    assert_all(statuses, 0xA700, output)
    assert_service_up(proc)
    assert uids(refused).isdisjoint(e["sop_instance_uid"] for e in proc.find())
    assert list((proc.data_dir / "tmp").iterdir()) == [], "refused data left in the spool"
    # Still full, and still refusing cleanly on a new association.
    statuses, output = store(proc.port, refused)
    assert_all(statuses, 0xA700, output)

    filler.remove()
    statuses, output = store(proc.port, refused)
    assert_all(statuses, 0x0000, output)
    found = assert_archive_consistent(proc, images)
    assert {e["sop_instance_uid"] for e in found} == uids(first + refused)
    assert_service_up(proc)


def test_status_reports_the_service_running_while_the_disk_stays_full(
    small_disk: Path, make_appliance, images: list[Path]
) -> None:
    """A full disk must not make `appliance status` call a healthy receiver hung.

    The receiver answers C-ECHO and refuses stores with 0xA700, as it should;
    the field engineer's first command must say it runs, even once the disk
    has been full for longer than the status' staleness limit (3 heartbeats).
    """
    proc: ApplianceProcess = make_appliance(data_dir=small_disk, min_free_mb=0)
    report = assert_service_up(proc)
    dicom = next(s for s in report["services"] if s["service"] == "dicom")
    Filler(small_disk).leave(0)
    time.sleep(3 * float(dicom["heartbeat_seconds"]) + 1.5)
    statuses, output = store(proc.port, images[:1])
    assert_all(statuses, 0xA700, output)
    assert echo(proc.port) == 0
    result = proc.cli("status", "--json", check=False)
    assert result.stdout.strip(), f"`appliance status --json` printed nothing:\n{result.stderr}"
    dicom = next(s for s in json.loads(result.stdout)["services"] if s["service"] == "dicom")
    assert dicom["state"] == "running", (
        f"`appliance status` says the DICOM service is {dicom['state']!r} (heartbeat "
        f"{dicom.get('heartbeat_age_seconds')} s old) while it answers C-ECHO and C-STORE"
    )


@pytest.mark.parametrize("reserve_mb", [0, 10])
def test_image_that_fits_above_the_reserve_is_stored(
    small_disk: Path, make_appliance, images: list[Path], reserve_mb: int
) -> None:
    """With the reserve plus one image plus a margin free, the image is taken.

    [node] min_free_mb reads "refuse new images below this free space": an
    image that leaves the reserve intact once stored must not be refused.
    """
    proc: ApplianceProcess = make_appliance(data_dir=small_disk, min_free_mb=reserve_mb)
    first, fits = images[:1], images[1:2]
    statuses, output = store(proc.port, first)
    assert_all(statuses, 0x0000, output)
    margin = 96 * 1024  # a new folder, the index's WAL pages, the state file: tens of KB
    Filler(small_disk).leave(reserve_mb * 1_000_000 + fits[0].stat().st_size + margin)
    before = free_bytes(small_disk)
    statuses, output = store(proc.port, fits)
    assert statuses[fits[0]] == 0x0000, (
        f"an image of {fits[0].stat().st_size} bytes was refused with {before} bytes free and a "
        f"reserve of {reserve_mb} MB:\n" + "\n".join(proc.log().splitlines()[-3:])
    )
    assert free_bytes(small_disk) >= reserve_mb * 1_000_000
    found = assert_archive_consistent(proc, images)
    assert {e["sop_instance_uid"] for e in found} == uids(first + fits)


def test_space_freed_little_by_little_gives_success_or_a700_never_worse(
    small_disk: Path, make_appliance, tmp_path: Path
) -> None:
    """Across the boundary where the spool file fits but the archive's own writes may not.

    Tiny images (16x16) and 4 KB of space given back per step: at some steps
    the received data fits on the disk, but a new patient folder or the
    SQLite index's growth does not. Every answer must then be success with
    the image indexed and intact, or 0xA700 with nothing left behind.
    """
    proc: ApplianceProcess = make_appliance(data_dir=small_disk, min_free_mb=0)
    warm = synthetic_ct(tmp_path / "warm", 1, size=16, patient_id="WARM-0001")
    statuses, output = store(proc.port, warm)
    assert_all(statuses, 0x0000, output)

    filler = Filler(small_disk)
    filler.leave(0)
    sent: list[Path] = list(warm)
    outcome: dict[Path, int] = {}
    # Each image is of a new patient, so the archive needs a new folder for it.
    for n in range(100):
        if list(outcome.values()).count(0x0000) >= 3:
            break
        image = synthetic_ct(tmp_path / f"step{n:03d}", 1, size=16, patient_id=f"STEP-{n:03d}")[0]
        sent.append(image)
        statuses, output = store(proc.port, [image])
        status = statuses[image]
        assert status in (0x0000, 0xA700), f"step {n}: status 0x{status:04X}\n{output[-3000:]}"
        outcome[image] = status
        indexed = quick_check(proc.data_dir)
        assert (_uid(image) in indexed) == (status == 0x0000), (
            f"step {n}: the index disagrees with the answer 0x{status:04X}"
        )
        filler.give_back(4096)
    assert_service_up(proc)
    assert 0xA700 in outcome.values(), "no store was refused: the disk was never full"
    assert 0x0000 in outcome.values(), "no store succeeded while space came back"

    filler.remove()
    retry = [p for p, s in outcome.items() if s == 0xA700]
    statuses, output = store(proc.port, retry)
    assert_all(statuses, 0x0000, output)
    found = assert_archive_consistent(proc, sent)
    assert {e["sop_instance_uid"] for e in found} == uids(sent)
    assert_service_up(proc)
