"""`appliance dicom`: the DICOM receiver as a service."""

from __future__ import annotations

import logging
import sqlite3

from appliance.archive import open_archive
from appliance.config import Settings
from appliance.dicom.scp import DicomService
from appliance.service import ServiceShell

log = logging.getLogger("appliance.dicom")


def run(settings: Settings) -> int:
    node = settings.node
    try:
        shell = ServiceShell("dicom", settings)
        archive = open_archive(settings)
        archive.cleanup_temp()
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot use data_dir %s: %s; check [node] data_dir, the disk and its permissions",
                  node.data_dir, exc)
        return 1
    service = DicomService(node, archive)
    try:
        service.start()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        shell.stopped(service.state())
        return 1
    shell.ready(f"{node.ae_title} listening on port {node.dicom_port}")
    try:
        shell.serve(state=service.state, healthy=lambda: service.listening)
    finally:
        service.stop(grace=max(5.0, min(node.dimse_timeout, 30.0)))
        shell.stopped(service.state())
    return 0
