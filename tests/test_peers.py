"""[[peer]] access control and [storage] on_conflict, with DCMTK and pynetdicom as the peers.

Every gateway here runs as `appliance dicom` on loopback with [[peer]]
entries appended to its configuration; storescu/echoscu choose their calling
AE with -aet, pynetdicom is the requestor when the test must read the
A-ASSOCIATE-RJ fields or per-context results.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from tests import raw_peer as raw
from tests.conftest import ApplianceProcess, echo, run_cli, storescu, synthetic_ct, wait_for

PROBE = '[[peer]]\nae_title = "PROBE"\nservices = []\n'  # the fixture's start-up C-ECHO


def gateway(make_appliance, extra: str) -> ApplianceProcess:
    """A gateway whose configuration ends with `extra` (TOML), started."""
    proc = make_appliance(start=False)
    with open(proc.config, "a", encoding="utf-8") as fp:
        fp.write("\n" + extra + "\n" + PROBE)
    proc.start()
    return proc


def logged(proc: ApplianceProcess, text: str) -> None:
    """Wait until the gateway's log holds `text` (the log is written by another process)."""
    wait_for(lambda: text in proc.log(), 10, f"{text!r} in the log")


def associate(port: int, calling: str, *contexts: str):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title="GATEWAY")


def test_an_unknown_calling_ae_is_rejected_with_the_reason_and_one_warning(make_appliance) -> None:
    proc = gateway(make_appliance, '[[peer]]\nae_title = "CT1"\n')
    rejected: list = []
    ae = AE(ae_title="STRANGER")
    ae.acse_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="GATEWAY",
                         evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: rejected.append(event.primitive))])
    assert assoc.is_rejected
    reply = [p for p in rejected if getattr(p, "result", None) is not None][-1]
    assert (reply.result, reply.result_source, reply.diagnostic) == (0x01, 0x01, 0x03)  # permanent, user, AE
    out = storescu(proc.port, synthetic_ct(proc.data_dir.parent / "in", 1), aet="STRANGER")
    assert "Calling AE Title Not Recognized" in out.stdout + out.stderr
    warnings = [line for line in proc.log().splitlines()
                if "WARNING" in line and "STRANGER@127.0.0.1" in line]
    assert len(warnings) == 2  # one per association, not one per reason
    assert "calling AE title not recognised" in warnings[0] and "add a [[peer]]" in warnings[0]
    assert echo(proc.port, aet="CT1") == 0


def test_peer_text_in_the_warning_is_escaped(make_appliance) -> None:
    proc = gateway(make_appliance, '[[peer]]\nae_title = "CT1"\n')
    sock = raw.connect(proc.port)
    sock.sendall(raw.associate_rq(calling=b"EVIL\x1b[2J"))
    reply = raw.read_pdu(sock)
    sock.close()
    assert reply is not None and reply[0] == 0x03 and reply[1][1:4] == bytes([1, 1, 3])
    logged(proc, "EVIL\\x1b[2J@127.0.0.1")
    assert "\x1b" not in proc.log()


def test_a_peer_without_store_gets_storage_refused_but_echo_works(make_appliance, tmp_path: Path) -> None:
    proc = gateway(make_appliance, '[[peer]]\nae_title = "VIEWER"\nservices = ["query"]\n'
                   '[[peer]]\nae_title = "CT1"\n')
    assoc = associate(proc.port, "VIEWER", Verification, CTImageStorage)
    assert assoc.is_established
    refused = {c.abstract_syntax: c.result for c in assoc.rejected_contexts}
    assert refused == {CTImageStorage: 0x01}  # user rejection: the class is served, not to this peer
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    files = synthetic_ct(tmp_path / "in", 1)
    assert storescu(proc.port, files, aet="VIEWER").returncode != 0
    assert proc.find() == []
    logged(proc, "lacks their service (add it to services)")
    assert storescu(proc.port, files, aet="CT1").returncode == 0
    assert [row["calling_ae"] for row in proc.find()] == ["CT1"]


def test_an_address_outside_the_peers_network_is_rejected(make_appliance, tmp_path: Path) -> None:
    proc = gateway(make_appliance, '[[peer]]\nae_title = "FARAWAY"\naddress = "10.9.9.0/24"\n'
                   '[[peer]]\nae_title = "NEAR"\naddress = "127.0.0.0/8"\n'
                   '[[peer]]\nae_title = "LOOP"\naddress = "127.0.0.1"\n')
    assert echo(proc.port, aet="FARAWAY") != 0
    logged(proc, "allows only 10.9.9.0/24; change that entry's address")
    assert echo(proc.port, aet="NEAR") == 0 and echo(proc.port, aet="LOOP") == 0
    files = synthetic_ct(tmp_path / "in", 1)
    assert storescu(proc.port, files, aet="FARAWAY").returncode != 0
    assert storescu(proc.port, files, aet="NEAR").returncode == 0
    sock = raw.connect(proc.port, source="127.0.0.2")  # LOOP's title, another address
    sock.sendall(raw.associate_rq(calling=b"LOOP"))
    reply = raw.read_pdu(sock)
    sock.close()
    assert reply is not None and reply[0] == 0x03 and reply[1][1:4] == bytes([1, 1, 3])
    logged(proc, "LOOP@127.0.0.2")
    assert "allows only 127.0.0.1;" in proc.log()


def _two_versions(directory: Path) -> tuple[Path, Path]:
    """One SOP Instance UID, two contents (the second with another pixel value)."""
    first = synthetic_ct(directory, 1)[0]
    ds = pydicom.dcmread(first)
    pixels = bytearray(ds.PixelData)
    pixels[0] ^= 0x01
    ds.PixelData = bytes(pixels)
    second = directory / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    return first, second


@pytest.mark.parametrize("mode", ["replace", "keep-first", "reject"])
def test_on_conflict_between_two_peers(make_appliance, tmp_path: Path, mode: str) -> None:
    proc = gateway(make_appliance, f'[storage]\non_conflict = "{mode}"\n'
                   '[[peer]]\nae_title = "CT_A"\n[[peer]]\nae_title = "CT_B"\n')
    first, second = _two_versions(tmp_path / "in")
    assert storescu(proc.port, [first], aet="CT_A").returncode == 0
    out = storescu(proc.port, [second], aet="CT_B")
    [row] = proc.find()
    stored = pydicom.dcmread(proc.data_dir / row["path"])
    quarantine = sorted((proc.data_dir / "quarantine").rglob("*.dcm"))
    if mode == "replace":
        assert out.returncode == 0 and row["calling_ae"] == "CT_B"
        assert stored.PixelData == pydicom.dcmread(second).PixelData
        assert quarantine == []
        return
    assert row["calling_ae"] == "CT_A"
    assert stored.PixelData == pydicom.dcmread(first).PixelData
    assert len(quarantine) == 1  # the second version's bytes are kept, never lost
    logged(proc, f"on_conflict = {mode}")
    if mode == "keep-first":
        assert out.returncode == 0 and "Store Response (Success)" in out.stdout + out.stderr
    else:
        assert "Status: 0x111" in out.stdout + out.stderr  # DCMTK names only C-STORE's own statuses
    # The first sender correcting its own image replaces it whatever the mode.
    assert storescu(proc.port, [second], aet="CT_A").returncode == 0
    [row] = proc.find()
    assert row["calling_ae"] == "CT_A"
    assert pydicom.dcmread(proc.data_dir / row["path"]).PixelData == pydicom.dcmread(second).PixelData


@pytest.mark.parametrize(("extra", "named"), [
    ('[[peer]]\nae_title = "CT1"\naddress = "192.168.1.0/33"\n', "[peer #1] address = '192.168.1.0/33'"),
    ('[[peer]]\nae_title = "CT1"\nservices = ["store", "print"]\n', "'print' is not a service"),
    ('[[peer]]\naddress = "10.0.0.1"\n', "[peer #1] is missing 'ae_title'"),
    ('[storage]\non_conflict = "merge"\n', "[storage] on_conflict = 'merge' is not allowed"),
    ('[node]\nallowed_callers = ["CT1"]\n[[peer]]\nae_title = "CT1"\n', "remove allowed_callers"),
])
def test_config_errors_exit_2_naming_file_and_key(tmp_path: Path, extra: str, named: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(extra, encoding="utf-8")
    result = run_cli(path, "dicom", check=False, timeout=30)
    assert result.returncode == 2
    assert str(path) in result.stderr and named in result.stderr


def test_allowed_callers_still_works_without_peers(make_appliance, tmp_path: Path) -> None:
    proc = make_appliance(start=False, allowed_callers=["PROBE", "CT1"])
    proc.start()
    assert echo(proc.port, aet="CT1") == 0
    assert echo(proc.port, aet="OTHER") != 0
    logged(proc, "not in [node] allowed_callers")


def test_addresses_and_networks_match_as_a_field_engineer_writes_them() -> None:
    from appliance.dicom.peers import PeerSettings, match

    entries = (PeerSettings("CT1", "192.168.1.0/24"), PeerSettings("WS", "::1"),
               PeerSettings("CT1", "10.0.0.7"), PeerSettings("ANY"))
    assert match(entries, "CT1", "192.168.1.200") is entries[0]
    assert match(entries, "CT1", "::ffff:192.168.1.9") is entries[0]  # IPv4 on a dual-stack socket
    assert match(entries, "CT1", "10.0.0.7") is entries[2]
    assert match(entries, "CT1", "10.0.0.8") is None
    assert match(entries, "WS", "::1") is entries[1] and match(entries, "WS", "127.0.0.1") is None
    assert match(entries, "ANY", "203.0.113.5") is entries[3]
    assert match(entries, "ct1", "192.168.1.200") is None  # AE titles are case-sensitive
