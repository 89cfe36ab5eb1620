"""A DICOM peer on a raw socket, for tests that must send what no toolkit would.

Builds A-ASSOCIATE-RQs field by field (so a test can get any one wrong),
command sets, P-DATA PDUs, and reads the PDUs the service answers with.
"""

from __future__ import annotations

import socket
import struct
import time

from appliance.dicom import command

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def context_item(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    subs = item(0x30, abstract.encode()) + b"".join(item(0x40, s.encode()) for s in syntaxes)
    return item(0x20, bytes([context_id, 0, 0, 0]) + subs)


def user_info(max_pdu: int = 16384, extra: bytes = b"") -> bytes:
    return item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4") + extra
                + item(0x55, b"RAWPEER"))


def associate_rq(calling: bytes = b"HOSTILE", called: bytes = b"GATEWAY", version: int = 1,
                 app_context: str | None = APP_CONTEXT,
                 contexts: list[tuple[int, str, list[str]]] | None = None,
                 user: bytes | None = None, raw_items: bytes | None = None) -> bytes:
    fixed = struct.pack(">HH", version, 0) + called.ljust(16, b" ")[:16] + calling.ljust(16, b" ")[:16]
    fixed += b"\0" * 32
    if raw_items is not None:
        return pdu(0x01, fixed + raw_items)
    items = item(0x10, app_context.encode()) if app_context is not None else b""
    for context_id, abstract, syntaxes in contexts or [(1, VERIFICATION, [IMPLICIT_LE]),
                                                        (3, CT, [EXPLICIT_LE])]:
        items += context_item(context_id, abstract, syntaxes)
    items += user if user is not None else user_info()
    return pdu(0x01, fixed + items)


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None when the service closed the connection."""
    sock.settimeout(timeout)
    try:
        head = _read(sock, 6)
        if head is None:
            return None
        length = struct.unpack(">I", head[2:6])[0]
        body = _read(sock, length)
        return None if body is None else (head[0], body)
    except (ConnectionResetError, BrokenPipeError):
        return None


def _read(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(port: int, **rq) -> tuple[socket.socket, dict[int, int]]:
    """An established association: the socket and {context id: result} from the AC."""
    sock = connect(port)
    sock.sendall(associate_rq(**rq))
    reply = read_pdu(sock)
    assert reply is not None and reply[0] == 0x02, f"expected A-ASSOCIATE-AC, got {reply!r}"
    return sock, accepted_contexts(reply[1])


def accepted_contexts(ac_body: bytes) -> dict[int, int]:
    results = {}
    offset = 68
    while offset < len(ac_body):
        item_type, length = ac_body[offset], struct.unpack_from(">H", ac_body, offset + 2)[0]
        if item_type == 0x21:
            results[ac_body[offset + 4]] = ac_body[offset + 6]
        offset += 4 + length
    return results


def user_sub_items(ac_body: bytes) -> dict[int, list[bytes]]:
    """The user information sub-items of an A-ASSOCIATE-AC, by type."""
    offset = 68
    found: dict[int, list[bytes]] = {}
    while offset < len(ac_body):
        item_type, length = ac_body[offset], struct.unpack_from(">H", ac_body, offset + 2)[0]
        if item_type == 0x50:
            inner, end = offset + 4, offset + 4 + length
            while inner < end:
                sub_type, sub_length = ac_body[inner], struct.unpack_from(">H", ac_body, inner + 2)[0]
                found.setdefault(sub_type, []).append(ac_body[inner + 4 : inner + 4 + sub_length])
                inner += 4 + sub_length
        offset += 4 + length
    return found


def command_set(field_value: int, message_id: int = 1, sop_class: str = CT, sop_instance: str = "",
                dataset: bool = True, group_length: int | None = None) -> bytes:
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, tag, len(value)) + value

    def ui(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    body = element(0x0002, ui(sop_class)) + element(0x0100, struct.pack("<H", field_value))
    body += element(0x0110, struct.pack("<H", message_id))
    if field_value == command.C_STORE_RQ:
        body += element(0x0700, struct.pack("<H", 0))
    body += element(0x0800, struct.pack("<H", 0x0000 if dataset else 0x0101))
    if sop_instance:
        body += element(0x1000, ui(sop_instance))
    length = len(body) if group_length is None else group_length
    return element(0x0000, struct.pack("<I", length)) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    return pdu(0x04, struct.pack(">IBB", len(data) + 2, context_id, control) + data)


def send_dataset(sock: socket.socket, context_id: int, data: bytes, fragment: int = 16000) -> None:
    for offset in range(0, len(data), fragment):
        last = offset + fragment >= len(data)
        sock.sendall(p_data(context_id, 0x02 if last else 0x00, data[offset : offset + fragment]))


def response_status(sock: socket.socket, timeout: float = 30.0) -> int:
    """The Status of the next response command set (assembled from its PDVs)."""
    data = bytearray()
    while True:
        reply = read_pdu(sock, timeout)
        assert reply is not None, "the service closed the connection instead of answering"
        assert reply[0] == 0x04, f"expected P-DATA-TF, got PDU type {reply[0]:#04x}"
        body = reply[1]
        pdv_length, _context, control = struct.unpack(">IBB", body[:6])
        data += body[6 : 4 + pdv_length]
        if control & 0x02:
            fields = command.parse(bytes(data))
            return command.us(fields, command.STATUS)


def store(sock: socket.socket, context_id: int, dataset: bytes, sop_class: str, sop_instance: str,
          message_id: int = 1) -> int:
    sock.sendall(p_data(context_id, 0x03, command_set(command.C_STORE_RQ, message_id, sop_class,
                                                      sop_instance)))
    send_dataset(sock, context_id, dataset)
    return response_status(sock)


def release(sock: socket.socket) -> None:
    sock.sendall(pdu(0x05, b"\0" * 4))
    reply = read_pdu(sock)
    assert reply is not None and reply[0] == 0x06, f"expected A-RELEASE-RP, got {reply!r}"
    sock.close()


def abort_of(reply: tuple[int, bytes] | None) -> tuple[int, int]:
    """(source, reason) of an A-ABORT reply; fails on anything else."""
    assert reply is not None and reply[0] == 0x07, f"expected A-ABORT, got {reply!r}"
    return reply[1][2], reply[1][3]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the service closes `sock` within `seconds` (anything it sends first is read)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False
