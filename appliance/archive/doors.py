"""The archive's front doors: producers that do not start from a complete file in tmp/.

Each puts a Part 10 file in the temp area (bytes from a dicomizer, a copy
from a CD or a share, a dataset built in memory) and goes on through
`Archive.ingest_file`, the one door, so the layout, the durable write and
the index rows are never done twice.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydicom.dataset import Dataset

from appliance.archive import durable, quarantine
from appliance.archive.errors import OutOfSpace, Rejected
from appliance.archive.part10 import write_part10_from_raw
from appliance.archive.quarantine import discard
from appliance.archive.record import UnreadableObject, read_record

if TYPE_CHECKING:
    from appliance.archive.ingest import Stored


class FrontDoors:
    """Mixed into Archive: needs `new_temp_path()`, `temp_dir` and `ingest_file()`."""

    temp_dir: Path

    @contextmanager
    def _new_temp(self) -> Iterator[Path]:
        """A temp path for a producer to write an object to; a failed write leaves nothing."""
        temp = self.new_temp_path()
        try:
            yield temp
        except UnreadableObject as exc:
            discard(temp)
            raise Rejected(str(exc), None) from None
        except OSError as exc:
            discard(temp)
            if durable.is_out_of_space(exc):
                raise OutOfSpace(f"cannot write to {self.temp_dir}: {exc.strerror}") from exc
            raise

    def ingest_bytes(self, data: bytes, **kwargs) -> Stored:
        """Archive a Part 10 byte string (a dicomizer's output, a test)."""
        with self._new_temp() as temp:
            temp.write_bytes(data)
        return self.ingest_file(temp, **kwargs)

    def ingest_copy(self, path: Path, **kwargs) -> Stored:
        """Archive a copy of the DICOM file at `path` (import from a CD, a share).

        A file without the Part 10 header (older CDs) is given one; its
        dataset bytes are then re-encoded by pydicom, not kept as they were.
        """
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # a FIFO must not block us
        with open(fd, "rb") as src:
            info = os.fstat(src.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise Rejected(f"{path}: not a regular file", None)
            head = src.read(132)
            src.seek(0)
            if info.st_size > quarantine.MAX_BYTES:
                self._check_before_copying(src, info.st_size, kwargs.get("source") or str(path),
                                           head[128:132] == b"DICM")
            with self._new_temp() as temp:
                if head[128:132] == b"DICM":
                    with open(temp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                else:
                    write_part10_from_raw(src, temp)
        return self.ingest_file(temp, **kwargs)

    def _check_before_copying(self, src: BinaryIO, size: int, source: str, part10: bool) -> None:
        """A file too big for quarantine is checked where it lies: refused, nothing copied."""
        limit = f"{size:,} bytes, over the quarantine limit of {quarantine.MAX_BYTES:,}: nothing copied"
        if not part10:
            raise Rejected(f"{source}: a dataset without the Part 10 header of {limit}", None)
        try:
            read_record(src, size, source)
        except UnreadableObject as exc:
            raise Rejected(f"{exc}; {limit}", None) from None
        finally:
            src.seek(0)

    def ingest_dataset(self, ds: Dataset, **kwargs) -> Stored:
        """Archive a dataset built in memory (dicomizers, the store-format converter)."""
        with self._new_temp() as temp:
            ds.save_as(temp, enforce_file_format=True)
        return self.ingest_file(temp, **kwargs)
