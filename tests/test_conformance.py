"""docs/CONFORMANCE.md stays true: its tables against the code and a running acceptor.

The machine-checkable tables of the conformance statement (between
`<!-- name: begin -->` and `<!-- name: end -->`) are parsed and compared with
the constants the code uses and with what `appliance dicom` negotiates when
pynetdicom proposes every listed class and syntax. A drift on either side
fails here, naming the rows that differ.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pynetdicom import AE, build_context
from pynetdicom.sop_class import _STORAGE_CLASSES

from appliance import __version__
from appliance.config import NodeSettings
from appliance.dicom import commitment, dimse, negotiation, pdu, requests, scp
from appliance.dicom.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFORMANCE.md"
CT = "1.2.840.10008.5.1.4.1.1.2"
NOT_LISTED_SYNTAX = "1.2.840.10008.1.2.4.94"  # JPIP Referenced: a real syntax pydicom cannot parse
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"


def table(name: str) -> list[list[str]]:
    """The data rows of the marked table `name`, cells stripped of backticks."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {name}: begin -->\n(.*?)\n<!-- {name}: end -->", text, re.S)
    assert found, f"docs/CONFORMANCE.md has no table marked {name!r}"
    rows = [line.strip().strip("|").split("|") for line in found.group(1).splitlines()]
    return [[cell.strip().strip("`") for cell in row] for row in rows[2:]]


def uids(name: str, column: int) -> list[str]:
    return [row[column] for row in table(name)]


def propose(port: int, contexts: list[tuple[str, list[str]]], calling: str = "CONFORMANCE"):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 20
    requested = [build_context(abstract, syntaxes) for abstract, syntaxes in contexts]
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY", contexts=requested)
    assert assoc.is_established, "the gateway did not accept the association"
    return assoc


def results(assoc, proposed: list[tuple[str, list[str]]]) -> dict[tuple[str, str], int]:
    """(abstract syntax, proposed syntax) -> result; contexts are numbered 1, 3, 5 ... as proposed."""
    by_id = {cx.context_id: 0 for cx in assoc.accepted_contexts}
    by_id.update({cx.context_id: cx.result for cx in assoc.rejected_contexts})
    return {(abstract, syntaxes[0]): by_id[2 * n + 1] for n, (abstract, syntaxes) in enumerate(proposed)}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """One `appliance dicom` for the whole module (negotiation does not change its state)."""
    from tests.conftest import ApplianceProcess, free_port, write_config

    tmp = tmp_path_factory.mktemp("conformance")
    port = free_port()
    config = write_config(tmp / "appliance.toml", {"dicom_port": port, "data_dir": str(tmp / "data"),
                                                   "min_free_mb": 1, "bind_address": "127.0.0.1"})
    proc = ApplianceProcess(config, tmp / "data", port, tmp / "appliance.log")
    proc.start()
    yield proc
    assert proc.stop() == 0


def test_implementation_identification_matches_the_code_and_the_association(gateway) -> None:
    rows = dict((row[0], row[1]) for row in table("implementation"))
    assert rows["Implementation Class UID"] == IMPLEMENTATION_CLASS_UID
    pattern = re.match(r"([A-Z_]+)<version>", rows["Implementation Version Name"])
    assert pattern, "the Implementation Version Name row must read PREFIX<version>"
    assert f"{pattern.group(1)}{__version__}"[:16] == IMPLEMENTATION_VERSION
    assoc = propose(gateway.port, [(negotiation.VERIFICATION, negotiation.UNCOMPRESSED)])
    try:
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION
    finally:
        assoc.release()


def test_association_limits_match_the_code_and_the_association(gateway) -> None:
    rows = {row[0]: row[1] for row in table("association-limits")}
    assert rows["Application context name"] == pdu.APPLICATION_CONTEXT
    [max_pdu] = [value for item, value in rows.items() if item.startswith("Maximum PDU length")]
    assert int(max_pdu) == NodeSettings().max_pdu
    assert int(rows["Largest A-ASSOCIATE-RQ read (bytes)"]) == pdu.MAX_ASSOCIATE_RQ
    assoc = propose(gateway.port, [(negotiation.VERIFICATION, negotiation.UNCOMPRESSED)])
    try:
        assert assoc.acceptor.maximum_length == int(max_pdu)
    finally:
        assoc.release()


def test_verification_syntaxes_listed_are_exactly_those_accepted(gateway) -> None:
    listed = uids("verification-transfer-syntaxes", 1)
    assert sorted(listed) == sorted(negotiation.UNCOMPRESSED)
    proposals = [(negotiation.VERIFICATION, [ts]) for ts in [*listed, "1.2.840.10008.1.2.4.50"]]
    assoc = propose(gateway.port, proposals)
    try:
        got = results(assoc, proposals)
    finally:
        assoc.release()
    assert {ts: got[(negotiation.VERIFICATION, ts)] for ts in listed} == dict.fromkeys(listed, 0)
    assert got[(negotiation.VERIFICATION, "1.2.840.10008.1.2.4.50")] == 4


def test_storage_syntaxes_listed_are_exactly_those_accepted(gateway) -> None:
    listed = uids("storage-transfer-syntaxes", 1)
    assert len(listed) == len(set(listed))
    missing = sorted(negotiation.READABLE_SYNTAXES - set(listed))
    extra = sorted(set(listed) - negotiation.READABLE_SYNTAXES)
    assert (missing, extra) == ([], []), "storage transfer syntax table differs from the code"
    assert NOT_LISTED_SYNTAX not in listed
    proposals = [(CT, [ts]) for ts in [*listed, NOT_LISTED_SYNTAX]]
    assoc = propose(gateway.port, proposals)
    try:
        got = results(assoc, proposals)
    finally:
        assoc.release()
    refused = sorted(ts for ts in listed if got[(CT, ts)] != 0)
    assert refused == [], f"listed as accepted but refused by the acceptor: {refused}"
    assert got[(CT, NOT_LISTED_SYNTAX)] == 4  # transfer syntaxes not supported


def test_storage_classes_listed_are_pynetdicoms_and_each_is_accepted(gateway) -> None:
    rows = table("storage-sop-classes")
    listed = [row[2] for row in rows]
    assert [int(row[0]) for row in rows] == list(range(1, len(rows) + 1))
    assert sorted(listed) == sorted(_STORAGE_CLASSES.values()), "storage class table differs from pynetdicom"
    assert {row[1]: row[2] for row in rows} == dict(_STORAGE_CLASSES)
    everything = [*listed, "1.2.3.4.5.6.7"]  # a vendor's private class is storage too
    got: dict[tuple[str, str], int] = {}
    for start in range(0, len(everything), 100):  # at most 128 contexts per association
        proposals = [(uid, ["1.2.840.10008.1.2.1"]) for uid in everything[start:start + 100]]
        assoc = propose(gateway.port, proposals)
        try:
            got.update(results(assoc, proposals))
        finally:
            assoc.release()
    refused = sorted(uid for uid in everything if got[(uid, "1.2.840.10008.1.2.1")] != 0)
    assert refused == [], f"listed storage classes refused by the acceptor: {refused}"
    proposals = [(WORKLIST_FIND, ["1.2.840.10008.1.2.1"]), (negotiation.VERIFICATION, ["1.2.840.10008.1.2"])]
    assoc = propose(gateway.port, proposals)
    try:
        assert results(assoc, proposals)[(WORKLIST_FIND, "1.2.840.10008.1.2.1")] == 3  # not a storage class
    finally:
        assoc.release()


def test_status_table_lists_every_status_the_code_returns() -> None:
    listed = {int(row[0], 16) for row in table("c-store-statuses")}
    returned = {scp.SUCCESS, scp.OUT_OF_RESOURCES, scp.CANNOT_UNDERSTAND, scp.SOP_CLASS_MISMATCH,
                scp.DUPLICATE_SOP_INSTANCE, dimse.UNRECOGNIZED_OPERATION, dimse.CANNOT_UNDERSTAND}
    assert listed == returned
    # Every status constant the two modules define is in the table.
    constants = {value for module in (scp, dimse) for name, value in vars(module).items()
                 if name.isupper() and isinstance(value, int) and 0 <= value <= 0xFFFF}
    missing = sorted(map(hex, constants - listed))
    assert missing == [], f"status constants missing from the table: {missing}"


def test_commitment_status_table_lists_every_status_the_commitment_scp_returns() -> None:
    listed = {int(row[0], 16) for row in table("commitment-statuses")}
    constants = {value for name, value in vars(commitment).items()
                 if name.isupper() and isinstance(value, int) and 0 <= value < 0xFF00 and name not in
                 ("REQUEST_COMMIT", "ALL_COMMITTED", "SOME_FAILED", "N_EVENT_REPORT_RSP")}
    assert listed == constants | {requests.OUT_OF_RESOURCES, requests.PROCESSING_FAILURE}


def test_storage_commitment_is_accepted_in_the_verification_syntaxes(gateway) -> None:
    listed = uids("verification-transfer-syntaxes", 1)
    proposals = [(commitment.SOP_CLASS, [ts]) for ts in [*listed, "1.2.840.10008.1.2.4.50"]]
    assoc = propose(gateway.port, proposals)
    try:
        got = results(assoc, proposals)
    finally:
        assoc.release()
    assert [got[(commitment.SOP_CLASS, ts)] for ts in listed] == [0] * len(listed)
    assert got[(commitment.SOP_CLASS, "1.2.840.10008.1.2.4.50")] == 4


def test_the_result_documented_for_a_peer_without_the_service_is_the_codes() -> None:
    text = " ".join(DOC.read_text(encoding="utf-8").split())
    assert "storage contexts refused with result 1 (user-rejection" in text
    assert negotiation.USER_REJECTION == 1
