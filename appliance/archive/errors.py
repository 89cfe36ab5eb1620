"""What the archive door answers besides success: the sender's status follows from these."""

from __future__ import annotations

from pathlib import Path


class OutOfSpace(Exception):
    """The archive cannot take the object now (disk full or unwritable); try later."""


class Rejected(Exception):
    """The object is not a usable DICOM instance; its bytes are in quarantine."""

    def __init__(self, reason: str, quarantined: Path | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.quarantined = quarantined


class Conflict(Rejected):
    """[storage] on_conflict = "reject": another sender's instance with other content; bytes in quarantine."""
