"""Fuzzing the door: the A-ASSOCIATE-RQ parser, the P-DATA loop and the dataset walk.

Hypothesis feeds each one bytes built to be nearly right (real item types,
lengths that lie by a little or a lot, odd and even context IDs, real
command sets cut anywhere) and plain noise. Whatever arrives, each must end
with its own protocol answer (pdu.Abort / pdu.Reject, an A-ABORT on the wire,
IncompleteDataset) and never with another exception, a spool file left
behind or a read larger than its bound.

`make test` runs FUZZ_EXAMPLES examples per target (default 200, well under
a minute); `make fuzz` runs many more. A finding is kept at the end as a
regression test of its own, beside the edge cases pinned there on purpose.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import NodeSettings
from appliance.dicom import associate, command, dimse, pdu, structure
from appliance.dicom.association import Association
from tests import raw_peer as raw

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
UIDS = st.sampled_from([raw.CT, raw.VERIFICATION, raw.EXPLICIT_LE, raw.IMPLICIT_LE, raw.APP_CONTEXT, "1.2",
                        "", "9" * 70])


# --- A-ASSOCIATE-RQ --------------------------------------------------------------------


@st.composite
def items(draw, types: list[int], depth: int = 0) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        item_type = draw(st.sampled_from(types))
        if depth < 2 and item_type in (0x20, 0x50):
            inner = (bytes([draw(st.integers(0, 255)), 0, 0, 0]) if item_type == 0x20 else b"")
            inner += draw(items([0x30, 0x40, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x58, 0x77], depth + 1))
        elif item_type in (0x51, 0x53):
            inner = draw(st.binary(min_size=0, max_size=6))
        elif item_type in (0x54, 0x56, 0x58):
            uid = draw(UIDS).encode()
            inner = struct.pack(">H", draw(st.sampled_from([len(uid), len(uid) + 3, 0, 0xFFFF]))) + uid
            inner += draw(st.binary(max_size=8))
        else:
            inner = draw(UIDS).encode()
        size = len(inner)
        length = draw(st.sampled_from([size, size, size + 1, max(0, size - 1), 0xFFFF]))
        out += struct.pack(">BBH", item_type, 0, length & 0xFFFF) + inner
    return out


@st.composite
def associate_bodies(draw) -> bytes:
    version = draw(st.sampled_from([1, 0, 0x7777, 2]))
    fixed = struct.pack(">HH", version, 0) + draw(st.binary(min_size=32, max_size=32)) + b"\0" * 32
    return fixed + draw(items([0x10, 0x20, 0x20, 0x50, 0x99]))


@FUZZ
@given(st.one_of(associate_bodies(), st.binary(max_size=400)))
def test_fuzz_associate_rq_parser(body: bytes) -> None:
    try:
        request = associate.parse_associate_rq(body)
    except pdu.Abort as exc:
        assert exc.source == pdu.SERVICE_PROVIDER and exc.reason in (4, 6)
        return
    try:
        associate.check(request, "GATEWAY", (), check_called_ae=True)
    except pdu.Reject as exc:
        assert exc.result in (1, 2) and exc.source in (1, 2, 3)
    results = [(c.context_id, 0, c.transfer_syntaxes[0]) for c in request.contexts]
    reply = associate.associate_ac(request, results, {c.abstract_syntax for c in request.contexts}, 16384,
                                   "1.2.3", "X")
    assert reply[0] == pdu.A_ASSOCIATE_AC
    assert struct.unpack(">I", reply[2:6])[0] == len(reply) - 6
    assert all(c.context_id % 2 for c in request.contexts)


# --- the P-DATA loop ----------------------------------------------------------------------


class FakeSocket:
    """A peer's byte stream, handed out in small pieces; what the service sends is kept."""

    def __init__(self, stream: bytes, step: int) -> None:
        self.stream = io.BytesIO(stream)
        self.step = step
        self.sent = bytearray()
        self.largest_read = 0

    def recv_into(self, view: memoryview, nbytes: int = 0) -> int:
        self.largest_read = max(self.largest_read, len(view))
        data = self.stream.read(min(len(view), self.step))
        view[: len(data)] = data
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def settimeout(self, value: float | None) -> None:
        pass

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class StubService:
    spool_dir: Path
    stored: list[Path] = field(default_factory=list)

    def store(self, request: dimse.StoreRequest) -> tuple[int, str]:
        self.stored.append(request.path)
        request.path.unlink(missing_ok=True)  # the archive consumes the file
        return 0, ""

    def echo(self, peer: dimse.Peer) -> int:
        return 0

    def rejected(self, peer: dimse.Peer, reason: str) -> None:
        pass

    def new_spool_path(self) -> Path:
        return self.spool_dir / f"{len(list(self.spool_dir.iterdir()))}-{os.urandom(4).hex()}.part"

    def closed(self, peer: dimse.Peer) -> None:
        pass


@dataclass
class StubAcceptor:
    node: NodeSettings
    handlers: StubService
    dispatch: dict = field(default_factory=lambda: dict(dimse.DEFAULT_DISPATCH))


def run_association(stream: bytes, spool_dir: Path, step: int = 7) -> FakeSocket:
    node = NodeSettings(max_pdu=16384, artim_timeout=0.01, network_timeout=5, dimse_timeout=5)
    service = StubService(spool_dir)
    sock = FakeSocket(stream, step)
    contexts = {1: (raw.VERIFICATION, raw.IMPLICIT_LE), 3: (raw.CT, raw.EXPLICIT_LE)}
    association = Association(sock, dimse.Peer("FUZZ", "GATEWAY", "127.0.0.1", 1), contexts, 512,
                              StubAcceptor(node, service))  # type: ignore[arg-type]
    association.run(b"AC")
    return sock


@st.composite
def pdu_streams(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["command", "echo", "data", "release", "abort", "other", "noise"]))
        context = draw(st.sampled_from([1, 3, 3, 2, 5]))
        if kind in ("command", "echo", "data"):
            if kind == "data":
                data = draw(st.binary(max_size=300))
                control = draw(st.sampled_from([0x00, 0x02]))
            else:
                field_value = command.C_ECHO_RQ if kind == "echo" else draw(
                    st.sampled_from([command.C_STORE_RQ, command.C_CANCEL_RQ, 0x0020, 0x8001]))
                data = raw.command_set(field_value, 1, raw.CT, "1.2.3", dataset=draw(st.booleans()))
                cut = draw(st.integers(0, len(data)))
                data = data[:cut] if draw(st.booleans()) else data
                control = draw(st.sampled_from([0x01, 0x03, 0x03]))
            pdv = struct.pack(">IBB", draw(st.sampled_from([len(data) + 2, len(data) + 2, 0, 1, 0xFFFFFFF0])),
                              context, control) + data
            length = draw(st.sampled_from([len(pdv), len(pdv), len(pdv) + 3, 0xFFFFFFFF, 5]))
            out += struct.pack(">BBI", 4, 0, length) + pdv
        elif kind == "release":
            out += struct.pack(">BBI", 5, 0, draw(st.sampled_from([4, 0x80000000]))) + b"\0" * 4
        elif kind == "abort":
            out += struct.pack(">BBI", 7, 0, draw(st.sampled_from([4, 0x80000000]))) + b"\0" * 4
        elif kind == "other":
            out += struct.pack(">BBI", draw(st.sampled_from([1, 2, 3, 6, 0, 8, 0xFF])), 0, 4) + b"\0" * 4
        else:
            out += draw(st.binary(max_size=40))
    return out


@FUZZ
@given(stream=pdu_streams(), step=st.integers(1, 4096))
def test_fuzz_p_data_loop(tmp_path_factory, stream: bytes, step: int) -> None:
    spool_dir = tmp_path_factory.mktemp("spool")
    sock = run_association(stream, spool_dir, step)
    assert list(spool_dir.iterdir()) == [], "a spool file outlived its association"
    assert sock.largest_read <= pdu.SMALL_READ
    _check_replies(bytes(sock.sent[2:]))


def _check_replies(sent: bytes) -> None:
    """Everything sent back is a whole PDU of a type an acceptor may send."""
    offset = 0
    while offset < len(sent):
        pdu_type, length = pdu.parse_header(sent[offset : offset + 6])
        assert pdu_type in (pdu.P_DATA_TF, pdu.A_RELEASE_RP, pdu.A_ABORT)
        offset += 6 + length
    assert offset == len(sent)


# --- the dataset walk -----------------------------------------------------------------------


@st.composite
def element_streams(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.sampled_from(["short", "long", "sq", "item", "end", "noise"]))
        if choice == "short":
            value = draw(st.binary(max_size=10))
            length = draw(st.sampled_from([len(value), 0xFFFF]))
            out += struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", length) + value
        elif choice == "long":
            value = draw(st.binary(max_size=10))
            out += struct.pack("<HH2sHI", 0x7FE0, 0x0010, draw(st.sampled_from([b"OB", b"UN", b"UT"])), 0,
                               draw(st.sampled_from([len(value), 0xFFFFFFFF, 0x7FFFFFFF]))) + value
        elif choice == "sq":
            length = draw(st.sampled_from([0xFFFFFFFF, 8, 16]))
            out += struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, length)
        elif choice == "item":
            out += struct.pack("<HHI", 0xFFFE, 0xE000, draw(st.sampled_from([0xFFFFFFFF, 0, 8])))
        elif choice == "end":
            out += struct.pack("<HHI", 0xFFFE, draw(st.sampled_from([0xE00D, 0xE0DD])), 0)
        else:
            out += draw(st.binary(max_size=16))
    return out


@FUZZ
@given(data=st.one_of(element_streams(), st.binary(max_size=300)),
       syntax=st.sampled_from([raw.EXPLICIT_LE, raw.IMPLICIT_LE, "1.2.840.10008.1.2.2", raw.DEFLATED]),
       depth=st.integers(1, 4))
def test_fuzz_dataset_walk(data: bytes, syntax: str, depth: int) -> None:
    if syntax == raw.DEFLATED:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    limits = structure.Limits(max_depth=depth, max_inflated=4096, max_ratio=50)
    with contextlib.suppress(structure.IncompleteDataset):
        structure.check_dataset(io.BytesIO(data), len(data), structure.UID(syntax), limits)


# --- regression tests: fuzz findings and the edge cases pinned with them ----------------------


def test_regression_pdv_shorter_than_its_header_is_aborted(tmp_path: Path) -> None:
    """A PDV declaring 0 or 1 bytes (less than its context ID and control byte)."""
    for length in (0, 1):
        stream = struct.pack(">BBI", 4, 0, 6) + struct.pack(">IBB", length, 3, 3)
        sent = bytes(run_association(stream, tmp_path).sent[2:])
        assert sent[:1] == b"\x07" and sent[8:10] == bytes([2, 6])


def test_regression_dataset_before_its_command(tmp_path: Path) -> None:
    stream = raw.p_data(3, 0x02, b"\x08\x00\x18\x00")
    sent = bytes(run_association(stream, tmp_path).sent[2:])
    assert sent[:1] == b"\x07" and sent[8:10] == bytes([2, 5])
    assert list(tmp_path.iterdir()) == []


def test_regression_command_field_missing_is_aborted(tmp_path: Path) -> None:
    body = struct.pack("<HHI", 0, 0x0110, 2) + struct.pack("<H", 1)
    stream = raw.p_data(1, 0x03, struct.pack("<HHII", 0, 0, 4, len(body)) + body)
    sent = bytes(run_association(stream, tmp_path).sent[2:])
    assert sent[:1] == b"\x07" and sent[8:10] == bytes([2, 6])


def test_regression_store_on_verification_context_response_fits_peer_max_pdu(tmp_path: Path) -> None:
    """Responses are cut to the peer's maximum PDU (512 in run_association)."""
    stream = raw.p_data(1, 0x03, raw.command_set(command.C_ECHO_RQ, 1, raw.VERIFICATION, dataset=False))
    sent = bytes(run_association(stream, tmp_path).sent[2:])
    assert sent[0] == pdu.P_DATA_TF and struct.unpack(">I", sent[2:6])[0] <= 512


@pytest.mark.parametrize("depth", [64, 65])
def test_regression_nesting_at_the_limit(depth: int) -> None:
    opening = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
               + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    data = opening * depth + closing * depth
    check = structure.check_dataset
    if depth <= structure.DEFAULT_LIMITS.max_depth:
        check(io.BytesIO(data), len(data), structure.UID(raw.EXPLICIT_LE))
    else:
        with pytest.raises(structure.LimitExceeded):
            check(io.BytesIO(data), len(data), structure.UID(raw.EXPLICIT_LE))


def test_regression_inflate_ratio_limit() -> None:
    """2 MB of zeros deflate to 2 kB: under the size limit, over the ratio."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 2 << 20) + b"\0" * (2 << 20))
    data += deflater.flush()
    with pytest.raises(structure.LimitExceeded, match="max_inflate_ratio"):
        structure.inflate(io.BytesIO(data), structure.Limits(max_inflated=64 << 20, max_ratio=200))
    assert len(structure.inflate(io.BytesIO(data), structure.Limits(max_ratio=2000))) == (2 << 20) + 12


def test_regression_inflate_size_limit() -> None:
    """With the ratio limit out of the way, the size limit alone stops inflation."""
    payload = bytes(range(256)) * 16384  # 4 MB
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = deflater.compress(payload) + deflater.flush()
    with pytest.raises(structure.LimitExceeded, match="max_inflated_mb"):
        structure.inflate(io.BytesIO(data), structure.Limits(max_inflated=2 << 20, max_ratio=100000))
