"""`appliance check` and the dicom service's check at start: the archive and its index agree again.

Files renamed into the archive without an index row are made both ways a
crash makes them: a process killed (SIGKILL) inside the index transaction,
after the rename; and rows deleted from an index that lost them.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TEST_FILES, storescu, synthetic_ct, wait_for

DESTINATION = '\n[[destination]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 9\n'

# Ingest one file through the door, and die (SIGKILL) inside the index transaction, after the rename.
KILLED_BEFORE_COMMIT = """
import os, signal, sys
from pathlib import Path
from appliance import config
from appliance.archive import open_archive
archive = open_archive(config.load(sys.argv[1]))
archive.on_indexed.append(lambda conn, row, record: os.kill(os.getpid(), signal.SIGKILL))
archive.ingest_copy(Path(sys.argv[2]), source="crash test")
"""


def _gateway(make_appliance):
    gateway = make_appliance(start=False)
    with open(gateway.config, "a", encoding="utf-8") as fp:
        fp.write(DESTINATION)
    return gateway


def _crash(gateway, tmp_path: Path) -> tuple[list[str], str]:
    """Three CTs received, two of their rows deleted; one more file renamed in, then killed.
    Returns the UIDs without rows and the killed one's."""
    files = synthetic_ct(tmp_path / "ct", 3, size=32)
    gateway.start()
    assert storescu(gateway.port, files).returncode == 0
    assert gateway.stop() == 0
    uids = [row["sop_instance_uid"] for row in gateway.find()][:2]
    with sqlite3.connect(gateway.data_dir / "index.sqlite") as conn:  # an index that lost two rows
        conn.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(u,) for u in uids])
        conn.executemany("DELETE FROM forward_jobs WHERE sop_instance_uid = ?", [(u,) for u in uids])
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_COMMIT, str(gateway.config),
                             str(TEST_FILES / "CT_small.dcm")], cwd=REPO, capture_output=True)
    assert killed.returncode == -9, killed.stderr
    ct = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"  # CT_small's SOP Instance UID
    assert list(gateway.data_dir.joinpath("archive").rglob(f"{ct}.dcm")), "renamed into the tree"
    assert {row["sop_instance_uid"] for row in gateway.find()}.isdisjoint({*uids, ct})
    return [*uids, ct], ct


def _jobs(gateway) -> dict[str, str]:
    out = gateway.cli("queue", "--json").stdout
    return {job["sop_instance_uid"]: job["state"] for job in map(json.loads, out.splitlines())}


def test_check_reindexes_files_without_rows_and_queues_their_jobs(make_appliance, tmp_path: Path) -> None:
    gateway = _gateway(make_appliance)
    lost, _ct = _crash(gateway, tmp_path)
    result = gateway.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("re-indexed  archive/") == 3
    assert "4 file(s), 1 index row(s) before the check: 3 re-indexed, 0 missing" in result.stdout
    assert {row["sop_instance_uid"] for row in gateway.find()} >= set(lost)
    jobs = _jobs(gateway)
    assert all(jobs.get(uid) == "pending" for uid in lost), jobs
    again = gateway.cli("check")
    assert "0 re-indexed, 0 missing" in again.stdout and "re-indexed  " not in again.stdout


def test_the_dicom_service_reindexes_at_start(make_appliance, tmp_path: Path) -> None:
    gateway = _gateway(make_appliance)
    lost, _ct = _crash(gateway, tmp_path)
    gateway.start()
    wait_for(lambda: {r["sop_instance_uid"] for r in gateway.find()} >= set(lost), 30, "the files re-indexed")
    jobs = _jobs(gateway)
    assert all(jobs.get(uid) == "pending" for uid in lost), jobs
    assert gateway.log().count("without an index row") == 3


def test_rows_without_files_are_reported_and_raise_an_alert(make_appliance, tmp_path: Path) -> None:
    gateway = _gateway(make_appliance)
    gateway.start()
    assert storescu(gateway.port, synthetic_ct(tmp_path / "ct", 2, size=32)).returncode == 0
    assert gateway.stop() == 0
    gone = gateway.find()[0]
    Path(gone["path"]).unlink()
    result = gateway.cli("check", "--verify", check=False)
    assert result.returncode == 1
    relative = Path(gone["path"]).relative_to(gateway.data_dir)
    assert (f"PROBLEM     indexed image missing from the archive: {relative} ({gone['sop_instance_uid']})"
            in result.stdout), result.stdout
    assert "1 checksum(s) verified" in result.stdout
    gateway.start()

    def alert() -> str | None:
        text = gateway.cli("status", check=False).stdout
        return text if "missing" in text else None

    status = wait_for(alert, 30, "the alert in appliance status")
    assert f"WARNING: indexed image missing from the archive: {relative}" in status, status


def test_verify_finds_a_changed_file(make_appliance, tmp_path: Path) -> None:
    gateway = _gateway(make_appliance)
    gateway.start()
    assert storescu(gateway.port, synthetic_ct(tmp_path / "ct", 1, size=32)).returncode == 0
    assert gateway.stop() == 0
    (row,) = gateway.find()
    with open(row["path"], "r+b") as fp:
        fp.seek(-10, 2)
        fp.write(b"XXXXXXXXXX")
    assert gateway.cli("check", check=False).returncode == 0, "the cheap check reads no file"
    result = gateway.cli("check", "--verify", check=False)
    assert result.returncode == 1 and "checksum differs from the index" in result.stdout


def test_an_unreadable_index_is_one_line_everywhere(make_appliance) -> None:
    gateway = _gateway(make_appliance)
    gateway.start()
    assert gateway.stop() == 0
    index = gateway.data_dir / "index.sqlite"
    index.write_bytes(b"this is not a database" * 100)
    for command in (["find"], ["queue"], ["check"], ["send", "--to", "pacs", "--study", "1.2.3"]):
        result = gateway.cli(*command, check=False)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
        assert "cannot be read" in result.stderr and "file is not a database" in result.stderr


def test_stores_are_refused_and_status_unhealthy_while_the_index_is_unusable(make_appliance,
                                                                             tmp_path: Path) -> None:
    from pydicom import dcmread
    from pynetdicom import AE

    gateway = _gateway(make_appliance)
    gateway.start()
    index = gateway.data_dir / "index.sqlite"
    with open(index, "r+b") as fp:  # the index damaged under the running service
        fp.write(b"\0" * 4096)
    for extra in (index.with_name("index.sqlite-wal"), index.with_name("index.sqlite-shm")):
        extra.unlink(missing_ok=True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dcmread(TEST_FILES / "CT_small.dcm"))
    finally:
        assoc.release()
    assert status.Status == 0xA700

    def unhealthy() -> str | None:
        text = gateway.cli("status", check=False).stdout
        return text if " unhealthy" in text else None

    report = wait_for(unhealthy, 30, "the dicom service unhealthy in appliance status")
    assert "cannot be written" in report or "cannot be read" in report, report
    assert "Traceback" not in gateway.log()
    assert gateway.cli("status", check=False).returncode == 3
