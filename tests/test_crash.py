"""Crash test: kill -9 the DICOM service while a 200-image storescu run is in flight.

The durability rule (DESIGN.md) says a sender hears "success" only once the
object is fsynced in the archive tree AND its index row is committed, and a
crash at any instant leaves either nothing or a complete, indexed object. So
after a SIGKILL and a restart:

- every image storescu saw acked is indexed, on disk, intact (sha256 of the
  file = the index's, dataset bytes = the source file's);
- nothing half-written is indexed (every indexed file is complete and intact,
  and no partial file lies anywhere in the archive tree);
- `PRAGMA integrity_check` says ok, and the temp dir is empty again;
- sending all 200 again completes, and the archive then holds exactly 200.

The kill lands at four moments: early in the run (5 acked), in the middle
(100 acked), in the middle of one image's reception (a partial spool file is
on disk), and while an image is being placed (in the archive tree, not yet
acked). A last test kills the service while corrected images (same SOP
Instance UIDs, new pixels) replace archived ones: the index must keep
describing a file that is there and intact.

A complete file renamed into the tree whose index row was not yet committed
is tolerated after a crash (the sender was not told success and sends it
again); a partial one never is.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.conftest import ApplianceProcess, dataset_bytes, dcmtk_env

N_IMAGES = 200
ROWS = COLUMNS = 512  # 512 KB of pixel data: each image spans several PDUs
PIXEL_BYTES = ROWS * COLUMNS * 2

SENDING_FILE = re.compile(r"Sending file: (?P<file>.+)$")
STORE_REQUEST = re.compile(r"Sending Store Request \(MsgID (?P<msgid>\d+),")
STORE_RESPONSE = re.compile(r"Received Store Response \((?P<status>.*)\)\s*$")


# --- images ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    path: Path
    sop_instance_uid: str
    data: bytes  # encoded dataset after the file meta


def write_ct(path: Path, number: int, uids: tuple[str, str, str], pixels: np.ndarray) -> Source:
    """One 16-bit CT image of the crash patient's series; `uids` = study, series, instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "CRASH-0001"
    ds.PatientName = "Crash^Test"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-CRASH"
    ds.SeriesNumber = 1
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Source(path, ds.SOPInstanceUID, dataset_bytes(path))


def random_pixels(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 4096, (ROWS, COLUMNS), dtype=np.uint16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    """200 distinct 512x512 16-bit CT images of one series, unique SOP Instance UIDs."""
    folder = tmp_path_factory.mktemp("crash-images")
    rng = np.random.default_rng(20240102)
    study, series = generate_uid(), generate_uid()
    return [
        write_ct(folder / f"ct{n:03d}.dcm", n, (study, series, generate_uid()), random_pixels(rng))
        for n in range(1, N_IMAGES + 1)
    ]


# --- storescu, watched while it runs ---------------------------------------------


@dataclass
class StoreRun:
    """`storescu -v` over one association, its log read line by line as it comes."""

    port: int
    files: list[Path]
    lines: list[str] = field(default_factory=list)
    successes: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            ["storescu", "-aet", "STORESCU", "-aec", "GATEWAY", "-v", "127.0.0.1", str(self.port),
             *[str(f) for f in self.files]],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
                if STORE_RESPONSE.search(line) and "(Success)" in line:
                    self.successes += 1

    def acked_so_far(self) -> int:
        with self._lock:
            return self.successes

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def responses(self) -> dict[Path, str]:
        """Response status per file, mapped through MsgIDs (files go in command-line order)."""
        with self._lock:
            lines = list(self.lines)
        result: dict[Path, str] = {}
        current_file: Path | None = None
        msgid: int | None = None
        for line in lines:
            if m := SENDING_FILE.search(line):
                current_file, msgid = Path(m["file"]), None
            elif m := STORE_REQUEST.search(line):
                msgid = int(m["msgid"])
                expected = self.files[msgid - 1]
                assert current_file == expected, (
                    f"MsgID {msgid} should carry {expected}, storescu said it sends {current_file}"
                )
            elif m := STORE_RESPONSE.search(line):
                assert msgid is not None, f"a response without a request in:\n{self.output()}"
                result[self.files[msgid - 1]] = m["status"]
                msgid = None
        return result


# --- checks -----------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def integrity(data_dir: Path) -> str:
    conn = sqlite3.connect(data_dir / "index.sqlite", timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def temp_files(data_dir: Path) -> list[Path]:
    temp = data_dir / "tmp"
    return sorted(temp.iterdir()) if temp.is_dir() else []


def archive_files(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "archive").rglob("*") if p.is_file()}


def check_index_entries(found: list[dict], sent: dict[str, list[bytes]]) -> None:
    """Every indexed instance is one we sent, complete and intact on disk.

    `sent` maps a SOP Instance UID to the datasets sent under it (several when
    a corrected version was sent again).
    """
    for entry in found:
        uid = entry["sop_instance_uid"]
        assert uid in sent, f"indexed instance {uid} was never sent"
        path = Path(entry["path"])
        assert path.is_file(), f"{uid} is indexed but its file {path} is missing"
        assert path.stat().st_size == entry["size"], f"{path}: size differs from the index"
        assert sha256_of(path) == entry["sha256"], (
            f"{path}: sha256 of the file differs from the index (the index describes other content)"
        )
        assert dataset_bytes(path) in sent[uid], f"{path}: dataset differs from what was sent"


def check_strays(data_dir: Path, found: list[dict], sent: dict[str, list[bytes]]) -> list[Path]:
    """Files in the archive tree the index does not know: each must be a complete object we sent."""
    strays = sorted(archive_files(data_dir) - {Path(e["path"]) for e in found})
    for path in strays:
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:
            raise AssertionError(f"unreadable file in the archive tree: {path}: {exc}") from None
        assert dataset_bytes(path) in sent.get(uid, []), f"partial or unknown file in the tree: {path}"
    return strays


def partial_spool_file(temp_dir: Path) -> Path | None:
    """A spool file being received right now: exists, but holds less than the pixel data."""
    try:
        entries = list(temp_dir.iterdir())
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            continue
        if 0 < size < PIXEL_BYTES:
            return entry
    return None


# --- kill -9 in the middle of a run ---------------------------------------------------------------------


def wait_for_moment(run: StoreRun, data_dir: Path, moment: str, acked_before: int) -> None:
    """Return when the service is at `moment` of the run, ready to be killed."""
    deadline = time.monotonic() + 60

    def still_going(what: str) -> None:
        assert run.running(), f"storescu ended before {what}:\n{run.output()}"
        assert time.monotonic() < deadline, f"no {what} in 60 s:\n{run.output()}"

    while run.acked_so_far() < acked_before:
        still_going(f"{acked_before} acks")
        time.sleep(0.001)
    if moment == "mid-image":
        # An image is half received: its spool file is on disk, incomplete.
        while partial_spool_file(data_dir / "tmp") is None:
            still_going("a partially received image")
            time.sleep(0.0002)
    elif moment == "mid-ingest":
        # An image is in the archive tree but storescu has not read its answer
        # yet: the service is between the rename and the index commit or the
        # response. The images of the run all share one folder.
        folder = next(p for p in (data_dir / "archive").rglob("*.dcm")).parent
        while sum(1 for _ in os.scandir(folder)) <= run.acked_so_far():
            still_going("an image placed but not yet acked")
            time.sleep(0.0002)


MOMENTS = {"early": 5, "mid-run": 100, "mid-image": 50, "mid-ingest": 30}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill9_during_store_loses_no_acked_image(
    make_appliance, sources: list[Source], moment: str
) -> None:
    acked_before_kill = MOMENTS[moment]
    proc: ApplianceProcess = make_appliance()
    files = [s.path for s in sources]
    by_uid = {s.sop_instance_uid: s for s in sources}
    by_path = {s.path: s for s in sources}
    sent = {uid: [s.data] for uid, s in by_uid.items()}

    run = StoreRun(proc.port, files)
    try:
        wait_for_moment(run, proc.data_dir, moment, acked_before_kill)
        proc.kill9()
        run.wait(timeout=60)
    finally:
        if run.running():
            run.process.kill()
            run.wait()

    responses = run.responses()
    acked = [path for path, status in responses.items() if status == "Success"]
    refused = {path: status for path, status in responses.items() if status != "Success"}
    assert not refused, f"stores refused before the crash: {refused}\n{run.output()}"
    assert acked_before_kill <= len(acked) < N_IMAGES, (
        f"{len(acked)} acked: the kill did not land inside the run\n{run.output()}"
    )
    leftovers = temp_files(proc.data_dir)
    # At "mid-image" the kill was aimed at a half-received spool file; the
    # receiver fills one in under a millisecond, so by the time the signal
    # lands the file may be complete or already ingested. Whatever it hit,
    # the checks below must hold.
    assert all(p.parent == proc.data_dir / "tmp" for p in leftovers)

    proc.start()

    # Leftover temp files of the dead process are removed at start.
    assert temp_files(proc.data_dir) == [], "temp files survive the restart"

    found = proc.find()
    indexed = {entry["sop_instance_uid"]: entry for entry in found}
    missing = [str(p) for p in acked if by_path[p].sop_instance_uid not in indexed]
    assert not missing, f"{len(missing)} acked image(s) lost by the crash: {missing[:5]}"
    check_index_entries(found, sent)
    # At most the images acked plus the one in flight (stored, answer not yet read) are indexed.
    assert len(acked) <= len(found) <= len(acked) + 1
    # No partial file anywhere in the tree. A file renamed into place whose row
    # was not committed yet is tolerated if complete (the sender was not told
    # success and sends it again, which overwrites it: see the end of the test).
    check_strays(proc.data_dir, found, sent)
    assert integrity(proc.data_dir) == "ok"

    # The sender sends everything again; the archive ends with exactly the 200.
    again = StoreRun(proc.port, files)
    assert again.wait(timeout=120) == 0, again.output()
    statuses = again.responses()
    assert len(statuses) == N_IMAGES and set(statuses.values()) == {"Success"}, again.output()

    found = proc.find()
    assert sorted(e["sop_instance_uid"] for e in found) == sorted(by_uid)
    check_index_entries(found, sent)
    assert archive_files(proc.data_dir) == {Path(e["path"]) for e in found}, (
        "files in the archive tree that the index does not know"
    )
    assert temp_files(proc.data_dir) == []
    assert integrity(proc.data_dir) == "ok"


# --- kill -9 while a corrected image replaces the one archived -----------------------

REPLACED = 60


def test_kill9_while_replacing_keeps_index_and_files_consistent(
    make_appliance, sources: list[Source], tmp_path: Path
) -> None:
    """A modality re-sends corrected images (same SOP Instance UIDs, new pixels) and the power fails.

    The archived version was acked, so at every instant the index must describe
    a file that is there and intact: the original, or the correction once its
    row is committed, never a missing file or a file with other content.
    """
    originals = sources[:REPLACED]
    proc: ApplianceProcess = make_appliance()
    first = StoreRun(proc.port, [s.path for s in originals])
    assert first.wait(timeout=60) == 0, first.output()
    assert set(first.responses().values()) == {"Success"}, first.output()
    rng = np.random.default_rng(7)
    corrected = []
    for number, original in enumerate(originals, start=1):
        ds = pydicom.dcmread(original.path, stop_before_pixels=True)
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        corrected.append(write_ct(tmp_path / f"fix{number:03d}.dcm", number, uids, random_pixels(rng)))
    folder = Path(proc.find()[0]["path"]).parent  # the series' folder in the archive tree

    run = StoreRun(proc.port, [c.path for c in corrected])
    try:
        deadline = time.monotonic() + 60
        while run.acked_so_far() < 10:
            assert run.running() and time.monotonic() < deadline, run.output()
            time.sleep(0.001)
        # Kill while one replacement is half done: the folder holds one file more
        # or one less than the images (a new version placed beside the old one,
        # or the old one set aside before the new one is placed).
        while sum(1 for _ in os.scandir(folder)) == REPLACED:
            assert run.running(), f"storescu ended before a replacement was caught:\n{run.output()}"
            assert time.monotonic() < deadline, run.output()
            time.sleep(0.0002)
        proc.kill9()
        run.wait(timeout=60)
    finally:
        if run.running():
            run.process.kill()
            run.wait()
    responses = run.responses()
    assert set(responses.values()) == {"Success"}, run.output()
    acked = {path for path, status in responses.items() if status == "Success"}
    assert 10 <= len(acked) < REPLACED, run.output()

    proc.start()
    assert temp_files(proc.data_dir) == []
    sent = {o.sop_instance_uid: [o.data, c.data] for o, c in zip(originals, corrected, strict=True)}
    found = proc.find()
    assert sorted(e["sop_instance_uid"] for e in found) == sorted(sent), "an acked image left the index"
    check_index_entries(found, sent)
    check_strays(proc.data_dir, found, sent)
    by_uid = {e["sop_instance_uid"]: e for e in found}
    for fix in corrected:
        if fix.path in acked:
            assert dataset_bytes(Path(by_uid[fix.sop_instance_uid]["path"])) == fix.data
    assert integrity(proc.data_dir) == "ok"

    # The modality sends its corrections again: all of them end up archived.
    again = StoreRun(proc.port, [c.path for c in corrected])
    assert again.wait(timeout=60) == 0, again.output()
    assert set(again.responses().values()) == {"Success"}, again.output()
    found = proc.find()
    check_index_entries(found, {c.sop_instance_uid: [c.data] for c in corrected})
    assert len(found) == REPLACED
    check_strays(proc.data_dir, found, sent)
    assert temp_files(proc.data_dir) == []
    assert integrity(proc.data_dir) == "ok"
