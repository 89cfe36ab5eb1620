"""DICOM Upper Layer PDUs (PS3.8 section 9.3): just what an acceptor of
Verification and Storage needs, read from and written to a blocking socket.

Why our own and not pynetdicom's: pynetdicom moves every PDU through two
polling threads and several copies; with the archive bypassed it still tops
out at ~250 C-STOREs per second on this machine, DCMTK at ~610
(docs/PERFORMANCE.md). Here a P-DATA value goes from the socket straight to
the spool file, in the association's own thread.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
MAX_ASSOCIATE_RQ = 1 << 20  # an A-ASSOCIATE-RQ larger than this is hostile


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""


class PeerClosed(Exception):
    """The peer closed the connection."""


def read_exact(sock: socket.socket, n: int, into: bytearray | None = None) -> bytes:
    buffer = into if into is not None else bytearray(n)
    view = memoryview(buffer)[:n]
    got = 0
    while got < n:
        count = sock.recv_into(view[got:], n - got)
        if count == 0:
            raise PeerClosed("connection closed by the peer")
        got += count
    return bytes(buffer[:n]) if into is None else b""


def read_header(sock: socket.socket) -> tuple[int, int]:
    """(PDU type, length) of the next PDU."""
    head = read_exact(sock, 6)
    return head[0], struct.unpack(">I", head[2:6])[0]


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\x00 ")


@dataclass
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRequest:
    called_ae: str
    calling_ae: str
    contexts: list[ProposedContext] = field(default_factory=list)
    max_pdu: int = 0  # the largest PDU the requestor accepts; 0 = no limit
    implementation_class_uid: str = ""
    implementation_version: str = ""


def parse_associate_rq(body: bytes) -> AssociateRequest:
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ too short")
    request = AssociateRequest(called_ae=_ae(body[4:20]), calling_ae=_ae(body[20:36]))
    offset = 68
    while offset + 4 <= len(body):
        item_type = body[offset]
        length = struct.unpack(">H", body[offset + 2 : offset + 4])[0]
        value = body[offset + 4 : offset + 4 + length]
        if len(value) != length:
            raise ProtocolError("A-ASSOCIATE-RQ item runs past the PDU")
        offset += 4 + length
        if item_type == 0x20:
            request.contexts.append(_parse_context(value))
        elif item_type == 0x50:
            _parse_user_info(value, request)
    return request


def _parse_context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise ProtocolError("presentation context item too short")
    context = ProposedContext(value[0], "", [])
    offset = 4
    while offset + 4 <= len(value):
        sub_type = value[offset]
        length = struct.unpack(">H", value[offset + 2 : offset + 4])[0]
        text = _uid(value[offset + 4 : offset + 4 + length])
        offset += 4 + length
        if sub_type == 0x30:
            context.abstract_syntax = text
        elif sub_type == 0x40:
            context.transfer_syntaxes.append(text)
    return context


def _parse_user_info(value: bytes, request: AssociateRequest) -> None:
    offset = 0
    while offset + 4 <= len(value):
        sub_type = value[offset]
        length = struct.unpack(">H", value[offset + 2 : offset + 4])[0]
        sub = value[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if sub_type == 0x51 and length == 4:
            request.max_pdu = struct.unpack(">I", sub)[0]
        elif sub_type == 0x52:
            request.implementation_class_uid = _uid(sub)
        elif sub_type == 0x55:
            request.implementation_version = _ae(sub)


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _padded_ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def associate_ac(
    request: AssociateRequest,
    results: list[tuple[int, int, str]],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version: str,
) -> bytes:
    """A-ASSOCIATE-AC; `results` holds (context id, result, transfer syntax) per context."""
    body = struct.pack(">HH", 1, 0) + _padded_ae(request.called_ae) + _padded_ae(request.calling_ae)
    body += b"\0" * 32 + _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, result, syntax in results:
        sub = _item(0x40, syntax.encode()) if result == 0 else _item(0x40, b"")
        body += _item(0x21, bytes([context_id, 0, result, 0]) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, implementation_class_uid.encode())
    user += _item(0x55, implementation_version.encode()[:16])
    body += _item(0x50, user)
    return _pdu(A_ASSOCIATE_AC, body)


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes([0, result, source, reason]))


def release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, b"\0" * 4)


def abort(source: int = 2, reason: int = 0) -> bytes:
    return _pdu(A_ABORT, bytes([0, 0, source, reason]))


def p_data(context_id: int, command: bytes, is_command: bool = True) -> bytes:
    """One P-DATA-TF holding one last-fragment PDV (our responses are small)."""
    header = 0x03 if is_command else 0x02
    pdv = struct.pack(">IBB", len(command) + 2, context_id, header) + command
    return _pdu(P_DATA_TF, pdv)
