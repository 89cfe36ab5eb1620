"""The acceptor against odd but legal peers and against garbage.

Legal: tiny PDUs (a dataset in hundreds of fragments), a pynetdicom
requestor, several presentation contexts for one SOP class. Garbage: random
bytes, an oversized A-ASSOCIATE-RQ, data before association, a peer that
vanishes mid-dataset. The service must answer each with the protocol's own
words (A-ASSOCIATE-RJ, A-ABORT) and keep serving everyone else.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE

from tests.conftest import TEST_FILES, dataset_bytes, echo, storescu, synthetic_ct


def _raw(port: int, payload: bytes, wait: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(payload)
        try:
            return sock.recv(4096)
        except (TimeoutError, ConnectionResetError):
            return b""


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


def test_tiny_pdus_reassemble_byte_for_byte(appliance, tmp_path) -> None:
    files = synthetic_ct(tmp_path / "ct", 3, size=256)
    result = storescu(appliance.port, files, "--max-send-pdu", "4096")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["sop_instance_uid"]: r for r in appliance.find()}
    for path in files:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(rows[uid]["path"]) == dataset_bytes(path)


def test_pynetdicom_requestor(appliance) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    ae.maximum_pdu_size = 8192
    assoc = ae.associate("127.0.0.1", appliance.port, ae_title="GATEWAY")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    (row,) = appliance.find()
    assert row["calling_ae"] == "PYNETDICOM"
    assert row["transfer_syntax_uid"] == "1.2.840.10008.1.2", "the sender's first syntax is kept"


def test_garbage_gets_an_abort_and_the_service_lives_on(appliance) -> None:
    # Random bytes where an A-ASSOCIATE-RQ should be.
    reply = _raw(appliance.port, os.urandom(64))
    assert reply == b"" or reply[0] == 0x07
    # An A-ASSOCIATE-RQ claiming 100 MB.
    reply = _raw(appliance.port, struct.pack(">BBI", 1, 0, 100_000_000) + b"\0" * 100)
    assert reply == b"" or reply[0] == 0x07
    # P-DATA before any association.
    reply = _raw(appliance.port, struct.pack(">BBI", 4, 0, 10) + b"\0" * 10)
    assert reply == b"" or reply[0] == 0x07
    # A truncated A-ASSOCIATE-RQ, then silence: the ACSE timeout closes it.
    with socket.create_connection(("127.0.0.1", appliance.port)) as sock:
        sock.sendall(struct.pack(">BBI", 1, 0, 200) + b"\0" * 20)
        assert echo(appliance.port) == 0, "one stuck peer must not block the others"
    assert appliance.process.poll() is None
    assert "Traceback" not in appliance.log()


def test_peer_vanishing_mid_dataset_leaves_nothing(appliance, tmp_path) -> None:
    files = synthetic_ct(tmp_path / "ct", 1, size=512)
    ae = AE(ae_title="VANISH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", appliance.port, ae_title="GATEWAY")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    # A C-STORE-RQ command set, then the first fragment of its dataset, then the peer is gone.
    cmd = pydicom.Dataset()
    cmd.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = "1.2.3.4"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, cmd)
    body = buffer.getvalue()
    body = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    context = assoc.accepted_contexts[0].context_id
    sock.sendall(_p_data(context, 0x03, body))
    sock.sendall(_p_data(context, 0x00, files[0].read_bytes()[400:20000]))
    sock.close()
    time.sleep(0.5)
    assert appliance.find() == []
    assert list((appliance.data_dir / "tmp").iterdir()) == []
    assert echo(appliance.port) == 0
