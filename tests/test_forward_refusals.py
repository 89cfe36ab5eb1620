"""A refusal is about one object, not the destination: it fails alone, the rest keeps flowing.

Real peers: Orthanc, which refuses private SOP classes by default, and DCMTK
storescp taking one syntax (a -xf profile) or Implicit VR only (+xi).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pynetdicom import AE

from appliance import config
from appliance.commands.status import collect
from appliance.web.page import warnings
from tests.conftest import STORESCP, TEST_FILES, dcmtk_env, free_port, storescu, wait_for
from tests.test_forward import Forwarder, Orthanc, _destination, _gateway, _jobs, _orthanc_instances
from tests.test_send import SR, _listening, _profile, _sr

PRIVATE = "1.2.392.200036.9116.7.8.1.1.1"  # a vendor's private storage class
FAST = "max_attempts = 2\n"


@pytest.fixture
def orthanc(tmp_path: Path):
    """A started Orthanc with its default configuration (private SOP classes refused)."""
    peer = Orthanc(workdir=tmp_path / "orthanc")
    peer.start()
    yield peer
    peer.stop()


def _private_object(tmp_path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.StudyInstanceUID = uid.generate_uid()  # a study of its own: an association of its own
    return ds


def _send_private(port: int, ds: pydicom.Dataset) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PRIVATE, uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def _storescp(tmp_path: Path, *options: str) -> tuple[subprocess.Popen, int, Path]:
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen([STORESCP, *options, "-aet", "PACS", "-od", str(out), str(port)],
                               env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _listening(port), 10, "storescp")
    return process, port, out


def test_orthanc_private_class_fails_alone(make_appliance, orthanc, tmp_path: Path) -> None:
    """The private object fails after max_attempts with one ERROR; the CT queued behind it arrives;
    the destination is never called unreachable; `queue drop --failed` keeps it as 'dropped'."""
    pacs = orthanc
    gateway = _gateway(make_appliance, _destination("pacs", "ORTHANC", pacs.port), forward=FAST)
    private = _private_object(tmp_path)
    _send_private(gateway.port, private)
    assert storescu(gateway.port, [TEST_FILES / "CT_small.dcm"]).returncode == 0
    forwarder = Forwarder(gateway)
    try:
        wait_for(lambda: pacs.stored_count() == 1, 30, "the CT at Orthanc")
        (failed,) = wait_for(lambda: _jobs(gateway, "--state", "failed"), 30, "the private job to fail")
    finally:
        forwarder.stop()
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    assert np.array_equal(_orthanc_instances(pacs)[ct.SOPInstanceUID].pixel_array, ct.pixel_array)
    assert failed["sop_instance_uid"] == private.SOPInstanceUID and failed["attempts"] == 2
    assert failed["last_status"] == (f"no presentation context accepted for SOP class {PRIVATE}; "
                                     "proposed Explicit VR Little Endian, Implicit VR Little Endian")
    log = forwarder.text()
    assert "cannot be reached" not in log and "reachable again" not in log and "Traceback" not in log
    (error,) = [line for line in log.splitlines() if " ERROR " in line]
    for part in ("pacs", "ORTHANC", private.SOPInstanceUID, PRIVATE, "Implicit VR Little Endian",
                 "queue retry", "queue drop"):
        assert part in error, (part, error)
    status = gateway.cli("status", check=False).stdout
    assert f"FAILED: job {failed['id']} to pacs ({private.SOPInstanceUID}) failed after 2 attempt(s): " \
           "no presentation context accepted" in status, status
    assert "UNREACHABLE" not in status
    page = warnings(collect(config.load(str(gateway.config))))  # the status page's banner
    assert any(f"job {failed['id']} to pacs" in w and "no presentation context accepted" in w for w in page)
    dropped = gateway.cli("queue", "drop", "--failed")
    assert dropped.stdout.startswith("1 job(s) dropped")
    (kept,) = _jobs(gateway, "--state", "dropped")
    assert kept["id"] == failed["id"] and kept["last_status"] == failed["last_status"]
    assert _jobs(gateway, "--state", "failed") == []
    assert "FAILED" not in gateway.cli("status", check=False).stdout
    assert gateway.cli("queue", "drop", "999999", check=False).returncode == 1
    assert gateway.cli("queue", "retry", str(kept["id"])).stdout.startswith("1 job(s) queued again")


def test_lossless_only_peer_and_a_lossy_object(make_appliance, tmp_path: Path) -> None:
    """A workstation taking only JPEG Lossless SV1, a lossy JPEG 2000 object in the same study as
    the CT: the lossy object fails alone, with why; the CT arrives as SV1 with equal pixels."""
    profile = _profile(tmp_path, [uid.JPEGLosslessSV1],
                       ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"))
    scp, port, out = _storescp(tmp_path, "-xf", str(profile), "Picky")
    try:
        gateway = _gateway(make_appliance, _destination("ws", "PACS", port, '["lossless", "uncompressed"]'),
                           forward=FAST)
        lossy = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm")
        lossy.StudyInstanceUID = pydicom.dcmread(TEST_FILES / "CT_small.dcm").StudyInstanceUID
        lossy.save_as(tmp_path / "lossy.dcm")
        assert storescu(gateway.port, [tmp_path / "lossy.dcm"], "-xw").returncode == 0
        assert storescu(gateway.port, [TEST_FILES / "CT_small.dcm"]).returncode == 0
        forwarder = Forwarder(gateway)
        try:
            (failed,) = wait_for(lambda: _jobs(gateway, "--state", "failed"), 30, "the lossy job to fail")
            wait_for(lambda: len(list(out.iterdir())) == 1, 30, "the CT at storescp")
        finally:
            forwarder.stop()
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert failed["sop_instance_uid"] == lossy.SOPInstanceUID
    assert "no presentation context accepted for SOP class Secondary Capture Image Storage" in \
        failed["last_status"]
    (got,) = [pydicom.dcmread(p) for p in out.iterdir()]
    assert got.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    assert np.array_equal(got.pixel_array, pydicom.dcmread(TEST_FILES / "CT_small.dcm").pixel_array)
    report = json.loads(gateway.cli("status", "--json", check=False).stdout)
    assert [job["id"] for job in report["forward_failed"]] == [failed["id"]]


def test_readme_sample_to_an_implicit_only_peer(make_appliance, tmp_path: Path) -> None:
    """storescp +xi and accepts = ["lossless", "uncompressed"]: the plain CT and an SR arrive."""
    scp, port, out = _storescp(tmp_path, "+xi")
    try:
        gateway = _gateway(make_appliance, _destination("pacs", "PACS", port, '["lossless", "uncompressed"]'))
        assert storescu(gateway.port, [TEST_FILES / "CT_small.dcm", _sr(tmp_path)]).returncode == 0
        forwarder = Forwarder(gateway)
        try:
            wait_for(lambda: len(list(out.iterdir())) == 2, 30, "CT and SR at storescp")
        finally:
            forwarder.stop()
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    received = {ds.SOPClassUID: ds for ds in (pydicom.dcmread(p) for p in out.iterdir())}
    assert {ds.file_meta.TransferSyntaxUID for ds in received.values()} == {uid.ImplicitVRLittleEndian}
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    assert np.array_equal(received[ct.SOPClassUID].pixel_array, ct.pixel_array)
    assert SR in received
    assert {job["state"] for job in _jobs(gateway)} == {"done"}
