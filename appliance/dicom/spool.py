"""Received C-STORE data goes straight to a temp file on the archive's disk.

pynetdicom can write an incoming dataset to a temp file as the P-DATA
fragments arrive (`STORE_RECV_CHUNKED_DATASET`) instead of holding it in
memory; a 500 MB tomosynthesis object then costs a PDU of RAM, not 1 GB, and
the archive can rename the file into place instead of copying it.

Two things in pynetdicom's way are fixed here, in one place:
- it creates the temp file with `tempfile.NamedTemporaryFile` in /tmp, which
  may be another file system (no atomic rename) or a small tmpfs;
- a write error (disk full) inside its decoder would abort the association,
  and the sender must instead hear 0xA700 (out of resources) and retry.

So pynetdicom's `NamedTemporaryFile` is replaced by a factory that makes a
`SpoolFile` in the archive's temp dir; a SpoolFile remembers a write error
instead of raising it, and the C-STORE handler turns it into 0xA700.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from pynetdicom import _config, dimse_messages


class SpoolFile:
    """Stands in for the NamedTemporaryFile pynetdicom writes a dataset to."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.error: OSError | None = None
        self.claimed = False
        self.file = self  # pynetdicom calls .file.flush()
        self._raw = None
        try:
            self._raw = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by pynetdicom
        except OSError as exc:
            self.error = exc

    def write(self, data: bytes) -> int:
        if self.error is None and self._raw is not None:
            try:
                view = memoryview(data)
                while view:
                    written = self._raw.write(view)
                    view = view[written:]
            except OSError as exc:
                self.error = exc
                self._drop()
        return len(data)

    def flush(self) -> None:
        """Writes are unbuffered: each one is already in the kernel."""

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def _drop(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)

    def __del__(self) -> None:
        # An association aborted mid-dataset never reaches the handler: the
        # partial file must not stay behind.
        if not self.claimed:
            self._drop()


_open: weakref.WeakValueDictionary[str, SpoolFile] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def install(new_temp_path: Callable[[], Path]) -> None:
    """Make pynetdicom spool every received dataset through a SpoolFile."""

    def factory(*_args, **_kwargs) -> SpoolFile:
        spool = SpoolFile(new_temp_path())
        with _lock:
            _open[spool.name] = spool
        return spool

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[attr-defined]


def claim(path: Path) -> SpoolFile | None:
    """The SpoolFile behind `event.dataset_path`; the handler now owns the file."""
    with _lock:
        spool = _open.pop(str(path), None)
    if spool is not None:
        spool.claimed = True
        spool.close()
    return spool
