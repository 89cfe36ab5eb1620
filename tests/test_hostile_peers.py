"""Hostile and broken peers on raw sockets, one test per way of attacking the DICOM port.

Each test asserts what the peer sees (the PDU or status it gets back) and
what the gateway keeps: it still answers DCMTK echoscu, the RSS of the
service stays within RSS_BOUND of its baseline during and after the attack,
no file is left in tmp/, and its descriptors come back to the baseline.
One gateway serves the module, with short timeouts so attacks end quickly.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pydicom
import pytest

from appliance.dicom import command
from tests import raw_peer as raw
from tests.conftest import (
    TEST_FILES,
    ApplianceProcess,
    dataset_bytes,
    echo,
    free_port,
    wait_for,
    write_config,
)

RSS_BOUND = 50 * 1024 * 1024  # the most an attack may add to the service's resident memory
DIMSE_TIMEOUT = 4.0
ACSE_TIMEOUT = 4.0
CT_SMALL = TEST_FILES / "CT_small.dcm"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[ApplianceProcess]:
    base = tmp_path_factory.mktemp("hostile")
    port = free_port()
    node = {"dicom_port": port, "data_dir": str(base / "data"), "min_free_mb": 1, "bind_address": "127.0.0.1",
            "network_timeout": 10, "dimse_timeout": DIMSE_TIMEOUT, "acse_timeout": ACSE_TIMEOUT,
            "artim_timeout": 2, "max_inflated_mb": 16, "max_pending": 32, "max_pending_per_address": 8,
            "check_called_ae": True}
    gw = ApplianceProcess(write_config(base / "appliance.toml", node), base / "data", port,
                          base / "appliance.log", node=node)
    gw.start()
    # Warm up every path once (a store opens the index), so the baseline is the idle state.
    sock, _ = raw.associate(port)
    assert _store_ct(sock) == 0
    raw.release(sock)
    yield gw
    assert gw.stop() == 0, gw.log()


def _store_ct(sock: socket.socket, message_id: int = 1) -> int:
    ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    return raw.store(sock, 3, dataset_bytes(CT_SMALL), ds.SOPClassUID, ds.SOPInstanceUID, message_id)


class Baseline:
    def __init__(self, gw: ApplianceProcess) -> None:
        self.gw = gw
        self.process = psutil.Process(gw.process.pid)
        wait_for(lambda: not list((gw.data_dir / "tmp").iterdir()), 10, "an empty tmp/")
        self.rss = self.process.memory_info().rss
        self.fds = wait_for(self._settled_fds, 15, "the service's descriptors to settle")
        self.peak = self.rss

    def _settled_fds(self) -> int:
        first = self.process.num_fds()
        time.sleep(0.3)
        return first if self.process.num_fds() == first else 0

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)
        grown = (self.peak - self.rss) >> 20
        assert self.peak - self.rss < RSS_BOUND, f"RSS grew by {grown} MB during the attack"

    def healthy(self) -> None:
        """Echo answered, RSS within the bound, tmp/ empty, descriptors back, no traceback."""
        self.sample()
        assert echo(self.gw.port) == 0, "the service must still answer echoscu"
        wait_for(lambda: not list((self.gw.data_dir / "tmp").iterdir()), 15, "tmp/ to be empty")
        wait_for(lambda: self.process.num_fds() <= self.fds, 20,
                 f"descriptors back to {self.fds} (now {self.process.num_fds()})")
        self.sample()
        assert "Traceback" not in self.gw.log()


@pytest.fixture
def baseline(gateway: ApplianceProcess) -> Baseline:
    return Baseline(gateway)


def _sampler(baseline: Baseline, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            baseline.peak = max(baseline.peak, baseline.process.memory_info().rss)
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- lengths that would have been allocated -------------------------------------------


def test_p_data_declaring_4_gb_is_aborted_without_allocating(gateway, baseline) -> None:
    socks = [raw.associate(gateway.port)[0] for _ in range(6)]
    for sock in socks:  # P-DATA length 0xFFFFFFFF holding a PDV of 0xFFFFFFF0
        sock.sendall(struct.pack(">BBI", 4, 0, 0xFFFFFFFF) + struct.pack(">IBB", 0xFFFFFFF0, 3, 0))
    for sock in socks:
        assert raw.abort_of(raw.read_pdu(sock)) == (2, 6)
        sock.close()
    baseline.healthy()


def test_pdu_over_the_advertised_maximum_is_aborted(gateway, baseline) -> None:
    sock, _ = raw.associate(gateway.port)
    pdv = struct.pack(">IBB", 2 * 1024 * 1024 + 2, 3, 0x00)
    sock.sendall(struct.pack(">BBI", 4, 0, 2 * 1024 * 1024 + 6) + pdv + b"\0" * 65536)
    assert raw.abort_of(raw.read_pdu(sock)) == (2, 6)
    sock.close()
    baseline.healthy()


def test_endless_command_fragments_are_aborted_at_64_kb(gateway, baseline) -> None:
    sock, _ = raw.associate(gateway.port)
    sent = 0
    reply = None
    for _ in range(400):  # 400 command fragments without the last bit
        try:
            sock.sendall(raw.p_data(3, 0x01, b"\0" * 16000))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        sock.settimeout(0.01)
        try:
            head = sock.recv(10, socket.MSG_PEEK)
        except TimeoutError:
            continue
        if head:
            reply = raw.read_pdu(sock)
            break
    assert raw.abort_of(reply) == (2, 6)
    assert sent <= 5, f"{sent} fragments of 16 kB were taken before the abort"
    sock.close()
    baseline.healthy()


def test_release_and_abort_declaring_2_gb(gateway, baseline) -> None:
    sock, _ = raw.associate(gateway.port)
    sock.sendall(struct.pack(">BBI", 5, 0, 0x80000000) + b"\0" * 4)
    assert raw.abort_of(raw.read_pdu(sock)) == (2, 6)
    sock.close()
    sock, _ = raw.associate(gateway.port)
    sock.sendall(struct.pack(">BBI", 7, 0, 0x80000000) + b"\0" * 4)
    assert raw.closed_within(sock, 5), "an A-ABORT must close the association at once"
    sock.close()
    baseline.healthy()


# --- slow peers ---------------------------------------------------------------------------


def test_trickling_associations_are_cut_at_dimse_timeout(gateway, baseline) -> None:
    """16 associations sending a P-DATA header one byte every 3 s (network_timeout is 10 s).

    The 16 associate one after another first: all at once from one address would be more
    pending connections than `max_pending_per_address` allows, and the oldest would be
    closed (that cap has a test of its own), which is not what this one is about.
    """
    ends: list[tuple[float, tuple[int, int] | None]] = []
    socks = [raw.associate(gateway.port)[0] for _ in range(16)]
    started = time.monotonic()

    def trickle(sock: socket.socket) -> None:
        header = struct.pack(">BBI", 4, 0, 2000) + struct.pack(">IBB", 1998, 3, 0x03)
        try:
            for byte in header + b"\0" * 20:
                sock.sendall(bytes([byte]))
                sock.settimeout(3)
                try:
                    head = sock.recv(10)
                except TimeoutError:
                    continue
                ends.append((time.monotonic() - started,
                             (head[8], head[9]) if len(head) == 10 and head[0] == 7 else None))
                return
        except (BrokenPipeError, ConnectionResetError):
            ends.append((time.monotonic() - started, None))
        finally:
            sock.close()

    threads = [threading.Thread(target=trickle, args=(sock,)) for sock in socks]
    for thread in threads:
        thread.start()
    assert echo(gateway.port) != 0, "16 trickling associations hold all 16 slots"
    for thread in threads:
        thread.join(30)
    assert len(ends) == 16
    assert all(reply == (2, 0) for _, reply in ends), ends
    assert max(t for t, _ in ends) < DIMSE_TIMEOUT + 3 + 3, "each message is cut at dimse_timeout"
    assert "dimse_timeout" in gateway.log()
    baseline.healthy()


def test_partial_associate_requests_cost_no_thread(gateway, baseline) -> None:
    """200 connections sending part of an A-ASSOCIATE-RQ, from 40 addresses; echoscu still served."""
    threads_before = baseline.process.num_threads()
    stop = threading.Event()
    _sampler(baseline, stop)
    socks = []
    for n in range(200):
        sock = raw.connect(gateway.port, source=f"127.0.1.{n % 40 + 1}")
        sock.sendall(b"\x01")
        socks.append(sock)
    time.sleep(0.5)
    assert baseline.process.num_threads() <= threads_before + 1, "a thread was spent on a pending connection"
    assert echo(gateway.port) == 0, "pending connections from other hosts must not lock echoscu out"
    time.sleep(ACSE_TIMEOUT + 1.5)
    for sock in socks:
        assert raw.closed_within(sock, 0.5), "acse_timeout must close a connection with no A-ASSOCIATE-RQ"
        sock.close()
    stop.set()
    log = gateway.log()
    assert "max_pending" in log and "acse_timeout" in log
    baseline.healthy()


# --- datasets that explode -------------------------------------------------------------


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw_uid = uid.encode()
    return raw_uid + b"\0" if len(raw_uid) % 2 else raw_uid


def _identity(uid: str) -> bytes:
    return (_element(0x0008, 0x0016, b"UI", _uid_value(raw.CT))
            + _element(0x0008, 0x0018, b"UI", _uid_value(uid)))


def _quarantined(gw: ApplianceProcess) -> list[Path]:
    return sorted((gw.data_dir / "quarantine").rglob("*.dcm"))


def test_deflate_bomb_is_refused_with_c000_and_quarantined(gateway, baseline) -> None:
    uid = "1.2.3.4.5.6.7.8.1"
    head = _identity(uid) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 1 << 30)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = bytearray(deflater.compress(head))
    zeros = b"\0" * (1 << 24)
    for _ in range(64):  # 1 GB of zeros once inflated
        bomb += deflater.compress(zeros)
    bomb += deflater.flush()
    assert len(bomb) < 1_100_000
    before = len(_quarantined(gateway))
    sock, results = raw.associate(gateway.port, contexts=[(5, raw.CT, [raw.DEFLATED])])
    assert results == {5: 0}
    stop = threading.Event()
    _sampler(baseline, stop)
    assert raw.store(sock, 5, bytes(bomb), raw.CT, uid) == 0xC000
    stop.set()
    raw.release(sock)
    assert len(_quarantined(gateway)) == before + 1
    assert "max_inflate_ratio" in gateway.log()
    baseline.healthy()


def test_ten_thousand_nested_sequences_are_refused_with_c000(gateway, baseline) -> None:
    uid = "1.2.3.4.5.6.7.8.2"
    opening = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
               + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    dataset = _identity(uid) + opening * 10_000 + closing * 10_000
    before = len(_quarantined(gateway))
    sock, _ = raw.associate(gateway.port)
    assert raw.store(sock, 3, dataset, raw.CT, uid) == 0xC000
    assert _store_ct(sock, 2) == 0, "the association goes on"
    raw.release(sock)
    assert len(_quarantined(gateway)) == before + 1
    assert "max_sequence_depth" in gateway.log() and "RecursionError" not in gateway.log()
    baseline.healthy()


# --- protocol abuse ------------------------------------------------------------------------


def test_second_command_in_the_middle_of_a_dataset_leaves_no_spool_file(gateway, baseline) -> None:
    sock, _ = raw.associate(gateway.port)
    data = dataset_bytes(CT_SMALL)
    sock.sendall(raw.p_data(3, 0x03, raw.command_set(command.C_STORE_RQ, 1, raw.CT, "1.2.3.9")))
    sock.sendall(raw.p_data(3, 0x00, data[:20000]))
    wait_for(lambda: list((gateway.data_dir / "tmp").iterdir()), 5, "the spool file")
    sock.sendall(raw.p_data(3, 0x03, raw.command_set(command.C_STORE_RQ, 2, raw.CT, "1.2.3.10")))
    assert raw.abort_of(raw.read_pdu(sock)) == (2, 5)
    sock.close()
    baseline.healthy()


@pytest.mark.parametrize("ending", ["peer A-ABORT", "silence past dimse_timeout", "release mid-dataset",
                                    "connection closed"])
def test_every_way_out_of_a_dataset_removes_its_spool_file(gateway, baseline, ending) -> None:
    sock, _ = raw.associate(gateway.port)
    sock.sendall(raw.p_data(3, 0x03, raw.command_set(command.C_STORE_RQ, 1, raw.CT, "1.2.3.11")))
    sock.sendall(raw.p_data(3, 0x00, dataset_bytes(CT_SMALL)[:20000]))
    wait_for(lambda: list((gateway.data_dir / "tmp").iterdir()), 5, "the spool file")
    if ending == "peer A-ABORT":
        sock.sendall(raw.pdu(0x07, bytes([0, 0, 0, 0])))
        assert raw.closed_within(sock, 5)
    elif ending == "silence past dimse_timeout":
        assert raw.abort_of(raw.read_pdu(sock, DIMSE_TIMEOUT + 5)) == (2, 0)
    elif ending == "release mid-dataset":
        sock.sendall(raw.pdu(0x05, b"\0" * 4))
        reply = raw.read_pdu(sock)
        assert reply is not None and reply[0] == 0x06
    else:
        sock.close()
    wait_for(lambda: not list((gateway.data_dir / "tmp").iterdir()), 5, f"tmp/ empty after {ending}")
    sock.close()
    baseline.healthy()


def test_forged_log_line_in_the_calling_ae_is_escaped(gateway, baseline) -> None:
    sock, _ = raw.associate(gateway.port, calling=b"\xff\x1b[31m\nFAKE LOG")
    raw.release(sock)
    log = gateway.log()
    assert "\x1b" not in log and "\xff" not in log
    assert not any(line.startswith("FAKE LOG") for line in log.splitlines())
    assert "\\xff\\x1b[31m\\x0aFAKE LOG@127.0.0.1" in log
    baseline.healthy()


def test_command_and_dataset_must_name_the_same_object(gateway, baseline) -> None:
    ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    data = dataset_bytes(CT_SMALL)
    before = len(_quarantined(gateway))
    sock, _ = raw.associate(gateway.port)
    assert raw.store(sock, 3, data, ds.SOPClassUID, "1.2.3.999") == 0xC000
    assert raw.store(sock, 3, data, "1.2.840.10008.5.1.4.1.1.4", ds.SOPInstanceUID, 2) == 0xA900
    raw.release(sock)
    assert len(_quarantined(gateway)) == before + 2
    assert "1.2.3.999" not in {row["sop_instance_uid"] for row in gateway.find()}
    baseline.healthy()


@pytest.mark.parametrize(("name", "rq", "expected"), [
    ("even context ID", {"contexts": [(2, raw.VERIFICATION, [raw.IMPLICIT_LE])]}, ("abort", 2, 6)),
    ("duplicate context IDs", {"contexts": [(1, raw.VERIFICATION, [raw.IMPLICIT_LE]),
                                            (1, raw.CT, [raw.EXPLICIT_LE])]}, ("abort", 2, 6)),
    ("protocol version without bit 0", {"version": 0x7776}, ("reject", 1, 2, 2)),
    ("no application context", {"app_context": None}, ("reject", 1, 1, 2)),
    ("another application context", {"app_context": "1.2.3"}, ("reject", 1, 1, 2)),
    ("empty calling AE", {"calling": b""}, ("reject", 1, 1, 3)),
    ("another called AE (check_called_ae)", {"called": b"PACS"}, ("reject", 1, 1, 7)),
    ("sub-item past its item", {"raw_items": raw.item(0x10, raw.APP_CONTEXT.encode()) + raw.item(
        0x20, bytes([1, 0, 0, 0]) + struct.pack(">BBH", 0x30, 0, 200) + b"1.2")},
     ("abort", 2, 6)),
])
def test_malformed_or_refused_associate_requests(gateway, baseline, name, rq, expected) -> None:
    sock = raw.connect(gateway.port)
    sock.sendall(raw.associate_rq(**rq))
    reply = raw.read_pdu(sock)
    if expected[0] == "abort":
        assert raw.abort_of(reply) == expected[1:], name
    else:
        assert reply is not None and reply[0] == 0x03, f"{name}: expected A-ASSOCIATE-RJ, got {reply!r}"
        assert tuple(reply[1][1:4]) == expected[1:], name
    assert raw.closed_within(sock, 5), f"{name}: the connection must be closed after the reply"
    sock.close()
    baseline.healthy()


@pytest.mark.parametrize(("name", "first", "expected"), [
    ("P-DATA before association", raw.p_data(1, 0x03, b"\0" * 12), (2, 2)),
    ("unknown PDU type", struct.pack(">BBI", 0x99, 0, 4) + b"\0" * 4, (2, 1)),
    ("A-ASSOCIATE-RQ declaring 100 MB", struct.pack(">BBI", 1, 0, 100_000_000) + b"\0" * 100, (2, 6)),
    ("A-ASSOCIATE-RQ shorter than its fixed part", struct.pack(">BBI", 1, 0, 20) + b"\0" * 20, (2, 6)),
])
def test_wrong_first_pdu_is_aborted(gateway, baseline, name, first, expected) -> None:
    sock = raw.connect(gateway.port)
    sock.sendall(first)
    assert raw.abort_of(raw.read_pdu(sock)) == expected, name
    assert raw.closed_within(sock, 5), name
    sock.close()
    baseline.healthy()


def test_protocol_version_0x7777_has_bit_0_and_is_accepted(gateway, baseline) -> None:
    """PS3.8 9.3.2: a receiver implementing version 1 tests only bit 0."""
    sock, results = raw.associate(gateway.port, version=0x7777)
    assert results[1] == 0
    raw.release(sock)
    baseline.healthy()


def test_command_group_length_lie_is_aborted(gateway, baseline) -> None:
    sock, _ = raw.associate(gateway.port)
    sock.sendall(raw.p_data(1, 0x03, raw.command_set(command.C_ECHO_RQ, 1, raw.VERIFICATION, dataset=False,
                                                     group_length=0x12345678)))
    assert raw.abort_of(raw.read_pdu(sock)) == (2, 6)
    sock.close()
    baseline.healthy()


def test_c_cancel_gets_no_response(gateway, baseline) -> None:
    sock, _ = raw.associate(gateway.port)
    cancel = raw.command_set(command.C_CANCEL_RQ, 7, raw.VERIFICATION, dataset=False)
    sock.sendall(raw.p_data(1, 0x03, cancel))
    sock.sendall(raw.p_data(1, 0x03, raw.command_set(command.C_ECHO_RQ, 8, raw.VERIFICATION, dataset=False)))
    reply = raw.read_pdu(sock)
    assert reply is not None and reply[0] == 0x04
    fields = command.parse(reply[1][6:])
    assert command.us(fields, command.COMMAND_FIELD) == command.C_ECHO_RSP, "C-CANCEL must not be answered"
    assert command.us(fields, command.MESSAGE_ID_RESPONDED) == 8
    raw.release(sock)
    baseline.healthy()


def test_negotiation_sub_items_get_their_replies(gateway, baseline) -> None:
    ct = raw.CT.encode()
    extra = raw.item(0x53, struct.pack(">HH", 5, 5))
    extra += raw.item(0x54, struct.pack(">H", len(ct)) + ct + bytes([1, 1]))
    extra += raw.item(0x56, struct.pack(">H", len(ct)) + ct + bytes([1, 0, 0, 0, 1, 0]))
    extra += raw.item(0x58, bytes([1, 1]) + struct.pack(">H", 4) + b"user" + struct.pack(">H", 0))
    sock = raw.connect(gateway.port)
    sock.sendall(raw.associate_rq(user=raw.user_info(extra=extra)))
    reply = raw.read_pdu(sock)
    assert reply is not None and reply[0] == 0x02
    subs = raw.user_sub_items(reply[1])
    assert subs[0x53] == [struct.pack(">HH", 1, 1)], "asynchronous operations window 1/1"
    assert subs[0x54] == [struct.pack(">H", len(ct)) + ct + bytes([1, 0])], "requestor SCU yes, SCP no"
    assert subs[0x56] == [struct.pack(">H", len(ct)) + ct + bytes([2, 0, 0, 0, 0, 0])]
    assert subs[0x59] == [struct.pack(">H", 0)], "user identity: empty server response, as requested"
    raw.release(sock)
    sock = raw.connect(gateway.port)  # no positive response requested: no 0x59
    sock.sendall(raw.associate_rq(user=raw.user_info(
        extra=raw.item(0x58, bytes([1, 0]) + struct.pack(">H", 4) + b"user" + struct.pack(">H", 0)))))
    reply = raw.read_pdu(sock)
    assert reply is not None and 0x59 not in raw.user_sub_items(reply[1])
    raw.release(sock)
    baseline.healthy()


def test_association_flood_gives_descriptors_back(gateway, baseline) -> None:
    """Each association's thread closes its index connection: 30 stores on 30 associations."""
    def index_fds() -> int:
        return len([f for f in baseline.process.open_files() if "index.sqlite" in f.path])

    before = index_fds()  # the main thread's connection (and one SQLite keeps for its locks)
    ds = pydicom.dcmread(CT_SMALL)
    for n in range(30):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.77.{n}"
        sock, _ = raw.associate(gateway.port)
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)
        assert raw.store(sock, 3, buffer.getvalue(), ds.SOPClassUID, ds.SOPInstanceUID) == 0
        raw.release(sock)
    wait_for(lambda: index_fds() <= before, 10, f"index descriptors back to {before} (now {index_fds()})")
    baseline.healthy()
