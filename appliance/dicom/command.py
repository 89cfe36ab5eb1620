"""DIMSE command sets (PS3.7 section 9.3, 9.1): group 0000 in Implicit VR Little Endian.

Reading a request's fields and writing a response. Command sets are a few
hundred bytes; a dict of tag -> bytes is all the structure they need. The
parser is strict because the acceptor trusts nothing: every element must lie
in group 0000 and inside the set, and the Command Group Length (0000,0000)
must equal the bytes that follow it.
"""

from __future__ import annotations

import struct

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF  # no response, ever (PS3.7 9.3.2.3)
NO_DATASET = 0x0101

AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_RESPONDED = 0x00000120
DATASET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000


class CommandError(ValueError):
    """A command set we cannot read."""


GROUP_LENGTH = 0x00000000


def parse(data: bytes) -> dict[int, bytes]:
    """The elements of a command set; CommandError names the first fault."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) is not in the command group 0000")
        if offset + length > len(data):
            raise CommandError(f"command element (0000,{element:04X}) declares {length} bytes, "
                               f"only {len(data) - offset} remain")
        elements[element] = data[offset : offset + length]
        offset += length
    if offset != len(data):
        raise CommandError("trailing bytes after the command set")
    raw_length = elements.get(GROUP_LENGTH)
    if raw_length is None or len(raw_length) != 4 or data[:4] != b"\0\0\0\0":
        raise CommandError("command group length (0000,0000) is missing or not first")
    (declared,) = struct.unpack("<I", raw_length)
    if declared != len(data) - 12:
        raise CommandError(f"command group length (0000,0000) says {declared} bytes, "
                           f"the set holds {len(data) - 12}")
    return elements


def us(elements: dict[int, bytes], tag: int, default: int | None = None) -> int:
    raw = elements.get(tag)
    if raw is None or len(raw) < 2:
        if default is None:
            raise CommandError(f"command element ({tag >> 16:04X},{tag & 0xFFFF:04X}) missing")
        return default
    return struct.unpack("<H", raw[:2])[0]


def ui(elements: dict[int, bytes], tag: int) -> str:
    """A UID value as text; latin-1 keeps each byte for peertext.printable()."""
    return elements.get(tag, b"").decode("latin-1").rstrip("\x00 ")


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _even(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class: str,
    sop_instance: str = "",
    error_comment: str = "",
) -> bytes:
    """A response command set with no dataset, elements in tag order."""
    body = _element(AFFECTED_SOP_CLASS, _even(sop_class, b"\0"))
    body += _element(COMMAND_FIELD, struct.pack("<H", command_field))
    body += _element(MESSAGE_ID_RESPONDED, struct.pack("<H", message_id))
    body += _element(DATASET_TYPE, struct.pack("<H", NO_DATASET))
    body += _element(STATUS, struct.pack("<H", status))
    if error_comment:
        body += _element(ERROR_COMMENT, _even(error_comment[:64], b" "))
    if sop_instance:
        body += _element(AFFECTED_SOP_INSTANCE, _even(sop_instance, b"\0"))
    return _element(0x00000000, struct.pack("<I", len(body))) + body
