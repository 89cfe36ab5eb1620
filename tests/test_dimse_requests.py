"""DIMSE requests to registered handlers: pending responses, C-CANCEL, and requests nobody serves.

A real Acceptor on loopback with a C-FIND handler registered by the test (the
way a query service will register), pynetdicom as the requestor; the raw
peer sends what pynetdicom cannot (a C-GET on a context it was not proposed
for, an oversized identifier).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import Verification

from appliance.config import NodeSettings
from appliance.dicom import requests
from appliance.dicom.acceptor import Acceptor
from tests import raw_peer as raw
from tests.conftest import free_port
from tests.test_fuzz_door import StubService

MANY = 2000


def slow_find(request: requests.Request) -> Iterator[tuple[int, Dataset | None]]:
    """MANY matches, one every 5 ms: long enough to be cancelled."""
    for n in range(MANY):
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = f"1.2.3.{n}"
        time.sleep(0.005)
        yield 0xFF00, match
    yield 0x0000, None


@pytest.fixture
def acceptor(tmp_path: Path) -> Iterator[Acceptor]:
    services = requests.Services()
    services.register(requests.C_FIND, str(FIND), slow_find)
    node = NodeSettings(dicom_port=free_port(), bind_address="127.0.0.1", data_dir=tmp_path)
    (tmp_path / "spool").mkdir()
    running = Acceptor(node, StubService(tmp_path / "spool"), services=services)  # type: ignore[arg-type]
    running.start()
    yield running
    running.stop(5)


def test_c_cancel_stops_a_c_find_with_0xfe00_and_the_association_goes_on(acceptor: Acceptor) -> None:
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(FIND)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", acceptor.node.dicom_port, ae_title="GATEWAY")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    context = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == FIND)
    statuses = []
    for status, _identifier in assoc.send_c_find(query, FIND, msg_id=7):
        statuses.append(status.Status)
        if len(statuses) == 3:
            assoc.send_c_cancel(7, context)
    assert statuses[:3] == [0xFF00] * 3
    assert statuses[-1] == 0xFE00 and len(statuses) < MANY // 2
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_request_nobody_serves_gets_0x0211_and_an_oversized_identifier_0xa700(acceptor: Acceptor) -> None:
    sock, results = raw.associate(acceptor.node.dicom_port,
                                  contexts=[(1, str(FIND), [raw.EXPLICIT_LE]), (3, raw.VERIFICATION,
                                                                                [raw.IMPLICIT_LE])])
    assert results == {1: 0, 3: 0}
    for field_value in (requests.C_GET, requests.C_MOVE, requests.N_CREATE, requests.N_SET):
        sock.sendall(raw.p_data(1, 0x03, raw.command_set(field_value, 2, str(FIND), dataset=False)))
        assert raw.response_status(sock) == 0x0211
    big = Dataset()
    big.QueryRetrieveLevel = "STUDY"
    big.add_new(0x00091010, "OB", b"x" * (requests.MAX_IDENTIFIER + 2))  # a private element
    sock.sendall(raw.p_data(1, 0x03, raw.command_set(requests.C_FIND, 3, str(FIND))))
    raw.send_dataset(sock, 1, encode(big, False, True) or b"")
    assert raw.response_status(sock) == 0xA700
    sock.sendall(raw.p_data(3, 0x03, raw.command_set(0x0030, 4, raw.VERIFICATION, dataset=False)))
    assert raw.response_status(sock) == 0x0000  # the association went on
    raw.release(sock)
