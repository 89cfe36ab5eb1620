"""Bad input gets a clear answer and costs nothing else.

Hostile patient IDs, a truncated dataset, an unknown calling AE, a private
SOP class: the service keeps running, other images keep arriving, and the
bytes of anything refused are kept with the reason.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from tests.conftest import TEST_FILES, echo, storescu

HOSTILE_IDS = ["../../etc", "../../../../../../tmp/evil", "x" * 300, "山田太郎", "ID\x00NUL", "..",
               "/abs/path", "a\\b", "", "NOID"]


def _variant(tmp_path: Path, patient_id: str, n: int, charset: str = "ISO_IR 192") -> Path:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SpecificCharacterSet = charset
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()  # one study per patient, as in real life
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / f"hostile{n}.dcm"
    ds.save_as(path)
    return path


@pytest.fixture(autouse=True)
def _lenient_writing():
    """A 300-character LO is invalid DICOM, which is the point: senders do it."""
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    yield
    pydicom.config.settings.writing_validation_mode = old


def test_hostile_patient_ids_land_inside_the_archive_in_distinct_folders(appliance, tmp_path: Path) -> None:
    files = [_variant(tmp_path, pid, n) for n, pid in enumerate(HOSTILE_IDS)]
    result = storescu(appliance.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = appliance.find()
    assert len(rows) == len(HOSTILE_IDS)
    archive = (appliance.data_dir / "archive").resolve()
    folders = set()
    for row in rows:
        path = Path(row["path"]).resolve()
        assert path.is_relative_to(archive), row["path"]
        assert path.is_file()
        folders.add(path.parent)
    assert len(folders) == len(HOSTILE_IDS), "two different patient IDs share a folder"
    # Nothing escaped: the only files under data_dir are the expected ones.
    assert not (tmp_path / "etc").exists() and not Path("/tmp/evil").exists()
    # The IDs are kept as sent in the index and can be searched.
    kanji = appliance.find("--patient-id", "山田太郎")
    assert len(kanji) == 1 and "~" in Path(kanji[0]["path"]).parent.name
    assert len(appliance.find("--patient-id", "../../etc")) == 1


def _send_raw(port: int, paths: list[Path]) -> list[int]:
    """Send Part 10 files with pynetdicom without decoding them: broken bytes go out as they are."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="RAWSCU")
        for path in paths:
            meta = pydicom.filereader.read_file_meta_info(path)
            ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        assert assoc.is_established
        statuses = []
        for path in paths:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if status else -1)
        assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def test_truncated_dataset_is_quarantined_and_the_association_goes_on(appliance, tmp_path: Path) -> None:
    good = TEST_FILES / "CT_small.dcm"
    data = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 5000])  # cut inside the pixel data
    statuses = _send_raw(appliance.port, [truncated, good])
    assert 0xC000 <= statuses[0] <= 0xCFFF
    assert statuses[1] == 0x0000, "the association must go on after a bad object"
    rows = appliance.find()
    assert [r["sop_instance_uid"] for r in rows] == [pydicom.dcmread(good).SOPInstanceUID]
    assert hashlib.sha256(Path(rows[0]["path"]).read_bytes()).hexdigest() == rows[0]["sha256"]
    quarantined = list((appliance.data_dir / "quarantine").rglob("*.dcm"))
    assert len(quarantined) == 1
    # The bytes kept are the dataset exactly as it arrived, and the reason is beside them.
    assert quarantined[0].read_bytes().endswith(data[: len(data) - 5000][-4000:])
    reason = quarantined[0].with_suffix(".txt").read_text()
    assert "truncated" in reason and "RAWSCU" in reason
    assert echo(appliance.port) == 0
    assert appliance.process.poll() is None


def test_garbage_dataset_is_refused(appliance, tmp_path: Path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm", stop_before_pixels=True)
    garbage = tmp_path / "garbage.dcm"
    meta_only = pydicom.filereader.read_file_meta_info(TEST_FILES / "CT_small.dcm")
    with open(garbage, "wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(fp, meta_only)
        fp.write(b"\x08\x00\x18\x00UI\xff\xff" + b"garbage" * 10)
    statuses = _send_raw(appliance.port, [garbage, TEST_FILES / "CT_small.dcm"])
    assert 0xC000 <= statuses[0] <= 0xCFFF and statuses[1] == 0
    assert len(appliance.find()) == 1 and ds.SOPInstanceUID == appliance.find()[0]["sop_instance_uid"]


def test_unknown_calling_ae_is_rejected_with_a_log_line(make_appliance) -> None:
    gateway = make_appliance(allowed_callers=["CR01", "PROBE"])
    assert echo(gateway.port, aet="INTRUDER") != 0
    assert echo(gateway.port, aet="CR01") == 0
    result = storescu(gateway.port, [TEST_FILES / "CT_small.dcm"], aet="INTRUDER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert gateway.find() == []
    log = gateway.log()
    assert "rejected association from INTRUDER" in log and "allowed_callers" in log
    assert storescu(gateway.port, [TEST_FILES / "CT_small.dcm"], aet="CR01").returncode == 0
    assert len(gateway.find()) == 1


def test_private_sop_class_is_stored(appliance, tmp_path: Path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SOPClassUID = "1.2.392.200036.9116.7.8.1.1.1"  # a vendor's private storage class
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    path = tmp_path / "private.dcm"
    ds.save_as(path)
    assert _send_raw(appliance.port, [path]) == [0]
    (row,) = appliance.find()
    assert row["sop_class_uid"] == "1.2.392.200036.9116.7.8.1.1.1"


def test_association_limit(make_appliance) -> None:
    gateway = make_appliance(max_associations=2)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", gateway.port, ae_title="GATEWAY") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", gateway.port, ae_title="GATEWAY")
        assert third.is_rejected
        assert "max_associations" in gateway.log()
    finally:
        for assoc in held:
            assoc.release()
    deadline = time.monotonic() + 10  # the acceptor threads end shortly after the release
    while echo(gateway.port) != 0:
        assert time.monotonic() < deadline, "the limit must free up when associations close"
        time.sleep(0.2)


def test_worklist_query_is_not_taken_for_storage(appliance) -> None:
    """A modality asking for a worklist hears "not supported", not an aborted association."""
    ae = AE(ae_title="CR01")
    ae.add_requested_context("1.2.840.10008.5.1.4.31")  # Modality Worklist Information Model FIND
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", appliance.port, ae_title="GATEWAY")
    assert assoc.is_established
    worklist = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == "1.2.840.10008.5.1.4.31"]
    assert worklist == [], "worklist is not served yet: its context must be refused"
    assoc.release()
    assert "Traceback" not in appliance.log()
