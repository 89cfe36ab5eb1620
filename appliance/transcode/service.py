"""`appliance convert`: the service that stores objects in the site's format.

A separate process from the receiver: a codec that crashes on a hostile
image, or a slow lossy encode, never touches the DICOM service.
"""

from __future__ import annotations

import logging
import time

from appliance.config import Settings
from appliance.service import start_with_archive
from appliance.transcode.pipeline import Converter

log = logging.getLogger("appliance.convert")
IDLE_SECONDS = 1.0


def run(settings: Settings) -> int:
    started = start_with_archive("convert", settings)
    if started is None:
        return 1
    shell, archive = started
    converter = Converter(archive, settings.storage)
    shell.ready(f"storing as {settings.storage.format}")

    def state() -> dict[str, object]:
        return {"format": settings.storage.format, "backlog": converter.backlog(),
                "converted": converter.converted, "kept_as_received": converter.kept}

    last_beat = 0.0
    while not shell.stopping.is_set():
        busy = converter.run_once()
        if time.monotonic() - last_beat > 2.0:
            shell.write_state(state())
            last_beat = time.monotonic()
        if not busy:
            shell.stopping.wait(IDLE_SECONDS)
    shell.stopped(state())
    return 0
