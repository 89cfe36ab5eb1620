"""The archive door without the network: temp cleanup, rollback when the index fails."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest

from appliance.archive.ingest import Archive, OutOfSpace
from tests.conftest import TEST_FILES


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_leftover_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        gone = archive.temp_dir / f"{dead.pid}-deadbeef.part"
        kept = archive.temp_dir / f"{sleeper.pid}-cafe.part"
        odd = archive.temp_dir / "garbage"
        for path in (gone, kept, odd):
            path.write_bytes(b"partial")
        assert archive.cleanup_temp() == 2
        assert not gone.exists() and not odd.exists()
        assert kept.exists(), "a running importer's temp file must survive"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_index_failure_leaves_no_file_and_restores_the_replaced_one(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    source = TEST_FILES / "CT_small.dcm"
    first = archive.ingest_bytes(source.read_bytes())
    assert first.outcome == "stored"
    original = first.path.read_bytes()

    def full_disk(*_args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    ds = pydicom.dcmread(source)
    ds.StudyDescription = "second version"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    archive.on_indexed.append(full_disk)
    with pytest.raises(OutOfSpace):
        archive.ingest_bytes(changed.read_bytes())
    # The old version is back in place, indexed as before; nothing half-done remains.
    assert first.path.read_bytes() == original
    assert archive.index.instance(ds.SOPInstanceUID)["sha256"] == first.sha256
    assert _files(archive.temp_dir) == []
    assert not archive.replaced_dir.exists() or _files(archive.replaced_dir) == []
    assert _files(archive.root) == [first.path]
    archive.on_indexed.clear()
    assert archive.ingest_bytes(changed.read_bytes()).outcome == "replaced"


def test_reserve_refuses_before_writing(tmp_path: Path) -> None:
    archive = Archive(tmp_path, min_free_bytes=10**18)
    with pytest.raises(OutOfSpace, match="free space or add disks"):
        archive.ingest_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    assert _files(archive.root) == [] and _files(archive.temp_dir) == []


def test_a_quarantine_record_cannot_be_forged_by_peer_text(tmp_path: Path) -> None:
    """The reason file beside a rejected object keeps one line per field, whatever the peer sent."""
    archive = Archive(tmp_path)
    temp = archive.temp_dir / "bad.part"
    temp.write_bytes(b"not dicom")
    kept = archive.quarantine(temp, "truncated", calling_ae="\xff\x1b[31m\nreason: FORGED",
                              source="/media/cd/a\nsource: FORGED")
    assert kept is not None and kept.read_bytes() == b"not dicom"
    lines = kept.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["reason", "calling_ae", "source", "received_at"]
    assert lines[1] == "calling_ae: \\xff\\x1b[31m\\x0areason: FORGED"
    assert "FORGED" not in lines[0] and lines[2].startswith("source: /media/cd/a\\x0a")
