"""Is the gateway receiving right now? The disk copier slows down while it is.

Receiving comes first: a modality waiting for its C-STORE answers is a
technologist waiting at the console. Copying to the USB disks pauses between
files ([disks] pause_ms) while new images are arriving, and runs at full speed
when the gateway is quiet (the evening copy window usually is). Arrivals are
read from the index, which every producer writes through the archive door, so
this needs no link to the DICOM service and sees imports and dicomized images
too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from appliance.archive.index import Index

LOOK_EVERY_SECONDS = 1.0


class ArrivalWatch:
    """Callable: True while images have arrived within the last `quiet_seconds`."""

    def __init__(self, index: Index, quiet_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.quiet_seconds = quiet_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._last_id: int | None = None  # the newest row seen (None: an empty index)
        self._looked = False
        self._last_arrival = float("-inf")
        self._looked_at = float("-inf")

    def __call__(self) -> bool:
        now = self.clock()
        with self._lock:
            if now - self._looked_at >= LOOK_EVERY_SECONDS:
                self._looked_at = now
                newest = self.index.connection().execute("SELECT MAX(id) FROM instances").fetchone()[0]
                if self._looked and newest != self._last_id:
                    self._last_arrival = now
                self._last_id, self._looked = newest, True
            return now - self._last_arrival < self.quiet_seconds
