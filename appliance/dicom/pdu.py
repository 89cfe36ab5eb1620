"""DICOM Upper Layer PDUs (PS3.8 section 9.3): constants, the errors a peer can
cause, bounded reads from a blocking socket, and the PDUs an acceptor sends.

Why our own and not pynetdicom's: pynetdicom moves every PDU through two
polling threads and several copies; with the archive bypassed it still tops
out at ~250 C-STOREs per second on this machine, DCMTK at ~610
(docs/PERFORMANCE.md). Here a P-DATA value goes from the socket straight to
the spool file, in the association's own thread.

Nothing here allocates a length the peer declared: `Reader.read_small` takes
at most `SMALL_READ` bytes and callers check every declared length against
the PDU, the item and the negotiated maximum before reading.
"""

from __future__ import annotations

import socket
import struct
import time

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# An A-ASSOCIATE-RQ larger than this is refused before it is buffered:
# 128 contexts x 20 transfer syntaxes each take about 70 kB.
MAX_ASSOCIATE_RQ = 1 << 18
SMALL_READ = 1 << 18  # the most read_small() ever allocates

# A-ABORT source (PS3.8 9.3.8): service user, service provider.
SERVICE_USER, SERVICE_PROVIDER = 0, 2
# A-ABORT reasons when the source is the service provider.
NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0, 1, 2
UNRECOGNIZED_PARAMETER, UNEXPECTED_PARAMETER, INVALID_PARAMETER = 4, 5, 6

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT, REJECTED_TRANSIENT = 1, 2
RJ_USER, RJ_ACSE, RJ_PRESENTATION = 1, 2, 3
RJ_NO_REASON, RJ_APPLICATION_CONTEXT, RJ_CALLING_AE, RJ_CALLED_AE = 1, 2, 3, 7
RJ_PROTOCOL_VERSION = 2  # with source RJ_ACSE
RJ_CONGESTION, RJ_LOCAL_LIMIT = 1, 2  # with source RJ_PRESENTATION


class Abort(Exception):
    """The peer broke the protocol: answer A-ABORT with this source and reason, then close."""

    def __init__(self, message: str, reason: int = INVALID_PARAMETER, source: int = SERVICE_PROVIDER):
        super().__init__(message)
        self.source = source
        self.reason = reason


class Reject(Exception):
    """A well-formed A-ASSOCIATE-RQ we refuse: answer A-ASSOCIATE-RJ."""

    def __init__(self, message: str, result: int, source: int, reason: int) -> None:
        super().__init__(message)
        self.result, self.source, self.reason = result, source, reason


class PeerClosed(Exception):
    """The peer closed the connection."""


class PeerAborted(Exception):
    """The peer sent A-ABORT."""


class DeadlineExceeded(Exception):
    """A DIMSE message was not complete within dimse_timeout."""


class Reader:
    """Bounded reads from a blocking socket, under an idle timeout and an optional deadline.

    `idle` (network_timeout) is the longest silence allowed per recv; while
    `deadline` (a time.monotonic() value) is set, every read also fails once
    it has passed, so a peer trickling one byte at a time cannot stretch a
    message past dimse_timeout.
    """

    def __init__(self, sock: socket.socket, idle: float) -> None:
        self.sock = sock
        self.idle = idle
        self.deadline: float | None = None
        self._timeout = -1.0

    def arm(self) -> None:
        """Set the socket timeout for the next reads: the idle time, or less if the deadline is near."""
        timeout = self.idle
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the DIMSE message was not complete in time")
            timeout = min(timeout, left)
        if abs(timeout - self._timeout) > 0.05:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def recv_into(self, view: memoryview) -> int:
        """One recv into `view`; 0 never returns (PeerClosed instead)."""
        try:
            count = self.sock.recv_into(view)
        except TimeoutError:
            if self.deadline is not None and time.monotonic() >= self.deadline - 0.1:
                raise DeadlineExceeded("the DIMSE message was not complete in time") from None
            raise
        if count == 0:
            raise PeerClosed("connection closed by the peer")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the DIMSE message was not complete in time")
        return count

    def read_into(self, view: memoryview) -> None:
        """Fill `view` completely."""
        got, n = 0, len(view)
        while got < n:
            got += self.recv_into(view[got:])

    def read_small(self, n: int) -> bytes:
        """Exactly `n` bytes, n checked by the caller and at most SMALL_READ."""
        if not 0 <= n <= SMALL_READ:
            raise ValueError(f"read_small({n}) is beyond the {SMALL_READ}-byte bound")
        buffer = bytearray(n)
        self.read_into(memoryview(buffer))
        return bytes(buffer)


def parse_header(head: bytes) -> tuple[int, int]:
    """(PDU type, length) from the six bytes of a PDU header."""
    return head[0], struct.unpack(">I", head[2:6])[0]


def item(item_type: int, value: bytes) -> bytes:
    """One item or sub-item: type, reserved byte, 2-byte length, value."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def associate_ac(fixed: bytes, items: bytes) -> bytes:
    """A-ASSOCIATE-AC: the 68-byte fixed part (called/calling AE echoed) and the items."""
    return _pdu(A_ASSOCIATE_AC, fixed + items)


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes([0, result, source, reason]))


def release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, b"\0" * 4)


def abort(source: int = SERVICE_PROVIDER, reason: int = NOT_SPECIFIED) -> bytes:
    return _pdu(A_ABORT, bytes([0, 0, source, reason if source == SERVICE_PROVIDER else 0]))


def p_data(context_id: int, data: bytes, is_command: bool = True, max_pdu: int = 0) -> bytes:
    """P-DATA-TF PDUs carrying `data` as PDVs, each PDU within the peer's `max_pdu` (0 = any)."""
    flags = 0x01 if is_command else 0x00
    room = len(data) if max_pdu <= 0 else max(1, max_pdu - 6)
    out = bytearray()
    offset = 0
    while True:
        chunk = data[offset : offset + room]
        offset += len(chunk)
        last = offset >= len(data)
        header = flags | (0x02 if last else 0x00)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk
        out += _pdu(P_DATA_TF, pdv)
        if last:
            return bytes(out)
