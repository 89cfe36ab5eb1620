"""Text a peer sent us, made safe for one log line.

AE titles, UIDs and error comments come off the wire: a calling AE of
`\\xff\\x1b[31m\\nFAKE LOG` written raw forges a log line and colours the
terminal of whoever reads it. Everything peer-supplied goes through
`printable()` before it reaches a log call or a status message.
"""

from __future__ import annotations

MAX_SHOWN = 128


def printable(value: str | bytes, limit: int = MAX_SHOWN) -> str:
    """`value` with every byte or character outside printable ASCII written as \\xNN.

    Bytes are shown byte by byte; text (decoded as latin-1 by the PDU parser,
    so each character is one byte) likewise; characters above U+00FF as
    \\uNNNN. A backslash is doubled so an escape cannot be faked. Long values
    are cut to `limit` characters with "..." so a peer cannot flood the log.
    """
    text = value.decode("latin-1") if isinstance(value, bytes | bytearray) else value
    out = []
    for char in text[:limit]:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    if len(text) > limit:
        out.append("...")
    return "".join(out)
