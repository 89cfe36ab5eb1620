"""Is this DICOM file complete? A walk over its elements without decoding them.

pydicom is lenient by design: a dataset cut short in its pixel data, or even
in its header, reads without a word. The archive must not index such a file
as an image (the sender would believe it was kept), so before ingest we walk
the encoded stream: every element's declared length must fit in the file,
every sequence and item of undefined length must be closed, and the stream
must end exactly on an element boundary. Values are skipped, not read, so the
walk costs microseconds even for a large multi-frame object.

The walk is also where hostile structure is stopped before pydicom sees it
(`Limits`): sequences nested deeper than `max_depth` (10,000 levels once
exhausted Python's recursion and cost the sender an endless retry), and a
Deflated dataset that inflates beyond `max_inflated` bytes or `max_ratio`
times its size (a 1 MB bomb inflates to 1 GB). Both raise `LimitExceeded`,
an `IncompleteDataset`: the object is quarantined and refused with 0xC000.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.uid import UID

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})  # float, double, integer
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
            b"UT", b"UV"}
DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.1.100"}


class IncompleteDataset(ValueError):
    """The encoded dataset is truncated or malformed; the message says where."""


class LimitExceeded(IncompleteDataset):
    """The dataset goes past a stated bound (nesting, inflated size or ratio)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what the walk accepts; [node] max_sequence_depth, max_inflated_mb, max_inflate_ratio."""

    max_depth: int = 64
    max_inflated: int = 64 * 1024 * 1024
    max_ratio: int = 200


DEFAULT_LIMITS = Limits()
RATIO_FLOOR = 1 << 20  # below 1 MB inflated, any ratio is harmless (small text compresses well)


class _Stream:
    """The file with its position kept in Python: tell() per element was a
    measurable share of each C-STORE (docs/PERFORMANCE.md)."""

    def __init__(self, fp: BinaryIO, size: int, little: bool) -> None:
        self.fp = fp
        self.size = size
        self.order = "<" if little else ">"
        self._pos = fp.tell()

    def pos(self) -> int:
        return self._pos

    def seek(self, position: int) -> None:
        self.fp.seek(position)
        self._pos = position

    def read(self, n: int, what: str) -> bytes:
        data = self.fp.read(n)
        self._pos += len(data)
        if len(data) != n:
            raise IncompleteDataset(f"file ends inside {what} at byte {self._pos}")
        return data

    def skip(self, n: int, what: str) -> None:
        end = self._pos + n
        if end > self.size:
            raise IncompleteDataset(
                f"{what} declares {n} bytes at byte {self._pos} but only "
                f"{self.size - self._pos} remain (dataset truncated)"
            )
        self.seek(end)

    def tag(self, what: str) -> int:
        group, element = struct.unpack(self.order + "HH", self.read(4, what))
        return (group << 16) | element

    def u32(self, what: str) -> int:
        return struct.unpack(self.order + "I", self.read(4, what))[0]

    def u16(self, what: str) -> int:
        return struct.unpack(self.order + "H", self.read(2, what))[0]


def _walk_dataset(
    s: _Stream, implicit: bool, end: int | None, in_item: bool, seen: dict[int, int] | None = None,
    depth: int = 0, limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Walk elements until `end` (defined-length item), an item delimiter or EOF.

    Top-level tags and their value lengths are added to `seen`, so callers can
    tell an image that lost its pixel data from an object that never had any.
    """
    while True:
        if end is not None and s.pos() >= end:
            if s.pos() > end:
                raise IncompleteDataset(f"an element overruns its item ending at byte {end}")
            return
        if end is None and not in_item and s.pos() == s.size:
            return
        tag = s.tag("an element tag")
        if tag == ITEM_END:
            if not in_item:
                raise IncompleteDataset(f"stray item delimiter at byte {s.pos() - 4}")
            s.u32("an item delimiter")
            return
        label = f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if tag in (ITEM, SEQUENCE_END):
            raise IncompleteDataset(f"unexpected item tag at byte {s.pos() - 4}")
        if implicit:
            vr = b"SQ" if tag != PIXEL_DATA else b"OB"
            length = s.u32(label)
        else:
            vr = s.read(2, label)
            if vr in LONG_VRS:
                s.read(2, label)
                length = s.u32(label)
            else:
                length = s.u16(label)
        if seen is not None:
            seen[tag] = length
        if length != UNDEFINED:
            if vr == b"SQ" and not implicit:
                _walk_sequence(s, implicit, label, depth + 1, limits, end=s.pos() + length)
            else:
                s.skip(length, label)
        elif tag == PIXEL_DATA:
            _walk_fragments(s, label)
        elif vr in (b"SQ", b"UN") or implicit:
            # UN of undefined length is an implicit VR little endian sequence (PS3.5 6.2.2).
            _walk_sequence(s, implicit or vr == b"UN", label, depth + 1, limits)
        else:
            raise IncompleteDataset(f"{label} has undefined length but VR {vr.decode('ascii', 'replace')}")


def _walk_sequence(s: _Stream, implicit: bool, label: str, depth: int, limits: Limits,
                   end: int | None = None) -> None:
    """The items of a sequence: up to its delimiter, or up to `end` for a defined length."""
    if depth > limits.max_depth:
        raise LimitExceeded(f"sequences nested more than {limits.max_depth} deep at byte {s.pos()} "
                            "([node] max_sequence_depth)")
    if end is not None and end > s.size:
        raise IncompleteDataset(f"{label} runs past the end of the file")
    while True:
        if end is not None and s.pos() >= end:
            if s.pos() > end:
                raise IncompleteDataset(f"an item overruns {label} ending at byte {end}")
            return
        tag = s.tag(f"a sequence item of {label}")
        length = s.u32(f"a sequence item of {label}")
        if tag == SEQUENCE_END and end is None:
            return
        if tag != ITEM:
            raise IncompleteDataset(f"{label}: expected an item at byte {s.pos() - 8}")
        if length == UNDEFINED:
            _walk_dataset(s, implicit, None, in_item=True, depth=depth, limits=limits)
        else:
            item_end = s.pos() + length
            if item_end > s.size or (end is not None and item_end > end):
                raise IncompleteDataset(f"an item of {label} runs past its end")
            _walk_dataset(s, implicit, item_end, in_item=True, depth=depth, limits=limits)


def _walk_fragments(s: _Stream, label: str) -> None:
    """Encapsulated pixel data: items with defined lengths, then a sequence delimiter."""
    while True:
        tag = s.tag(f"a pixel data fragment of {label}")
        length = s.u32(f"a pixel data fragment of {label}")
        if tag == SEQUENCE_END:
            return
        if tag != ITEM or length == UNDEFINED:
            raise IncompleteDataset(f"malformed pixel data fragment at byte {s.pos() - 8}")
        s.skip(length, "a pixel data fragment")


@dataclass(frozen=True)
class Walk:
    """What the walk learned: transfer syntax, top-level tags, where the dataset starts."""

    transfer_syntax: UID
    top_level_lengths: dict[int, int]  # tag -> value length (UNDEFINED if encapsulated)
    dataset_offset: int

    @property
    def has_pixel_data(self) -> bool:
        return any(tag in self.top_level_lengths for tag in PIXEL_TAGS)

    @property
    def native_pixel_data_length(self) -> int | None:
        """Length of uncompressed (7FE0,0010), None if absent or encapsulated."""
        length = self.top_level_lengths.get(PIXEL_DATA)
        return None if length is None or length == UNDEFINED else length


def check_part10(fp: BinaryIO, size: int, limits: Limits = DEFAULT_LIMITS) -> Walk:
    """Check a DICOM Part 10 file; raise IncompleteDataset if it is not complete."""
    fp.seek(0)
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise IncompleteDataset("no DICOM preamble ('DICM' at byte 128): not a DICOM Part 10 file")
    s = _Stream(fp, size, little=True)
    transfer_syntax = ""
    while True:
        start = s.pos()
        if start == size:
            break
        group = struct.unpack("<H", s.read(2, "the file meta information"))[0]
        s.seek(start)
        if group != 0x0002:
            break
        tag = s.tag("the file meta information")
        vr = s.read(2, "the file meta information")
        if vr in LONG_VRS:
            s.read(2, "the file meta information")
            length = s.u32("the file meta information")
        else:
            length = s.u16("the file meta information")
        if tag == 0x00020010:
            value = s.read(length, "the transfer syntax UID")
            transfer_syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
        else:
            s.skip(length, "a file meta element")
    if not transfer_syntax:
        raise IncompleteDataset("file meta information has no Transfer Syntax UID (0002,0010)")
    dataset_offset = s.pos()
    seen = check_dataset(fp, size, UID(transfer_syntax), limits)
    return Walk(UID(transfer_syntax), seen, dataset_offset)


def inflate(fp: BinaryIO, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The rest of `fp` inflated, stopping as soon as a limit is passed (never inflating it all)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    consumed = 0
    try:
        while True:
            chunk = fp.read(1 << 16)
            if not chunk:
                break
            pending = chunk
            while pending:
                before = len(pending)
                # At most RATIO_FLOOR per call, so a bomb is caught by its ratio after
                # about 1 MB instead of filling max_inflated first.
                out += inflater.decompress(pending, min(RATIO_FLOOR, limits.max_inflated + 1 - len(out)))
                pending = inflater.unconsumed_tail
                consumed += before - len(pending)
                if len(out) > limits.max_inflated:
                    raise LimitExceeded(f"deflated dataset inflates beyond {limits.max_inflated} bytes "
                                        "([node] max_inflated_mb)")
                if len(out) > RATIO_FLOOR and len(out) > limits.max_ratio * max(consumed, 1):
                    raise LimitExceeded(f"deflated dataset inflates more than {limits.max_ratio} times "
                                        f"({consumed} bytes gave {len(out)}; [node] max_inflate_ratio)")
                if inflater.eof:
                    break
            if inflater.eof:
                break
        out += inflater.flush()
    except zlib.error as exc:
        raise IncompleteDataset(f"deflated dataset cannot be inflated: {exc}") from None
    if not inflater.eof:
        raise IncompleteDataset("deflated dataset is truncated")
    return bytes(out)


def check_dataset(fp: BinaryIO, size: int, transfer_syntax: UID,
                  limits: Limits = DEFAULT_LIMITS) -> dict[int, int]:
    """Walk the dataset from the current position; return its top-level tag lengths."""
    if transfer_syntax in DEFLATED:
        data = inflate(fp, limits)
        fp, size = io.BytesIO(data), len(data)
        little, implicit = True, False
    elif transfer_syntax == "1.2.840.10008.1.2":
        little, implicit = True, True
    elif transfer_syntax == "1.2.840.10008.1.2.2":
        little, implicit = False, False
    else:
        little, implicit = True, False  # explicit VR little endian and all encapsulated ones
    seen: dict[int, int] = {}
    _walk_dataset(_Stream(fp, size, little), implicit, None, in_item=False, seen=seen, limits=limits)
    return seen
