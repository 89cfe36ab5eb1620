"""`appliance dicom`: the DICOM receiver as a service."""

from __future__ import annotations

import logging

from appliance.archive.ingest import Archive
from appliance.config import Settings
from appliance.dicom.scp import DicomService
from appliance.service import ServiceShell

log = logging.getLogger("appliance.dicom")


def run(settings: Settings) -> int:
    shell = ServiceShell("dicom", settings)
    node = settings.node
    archive = Archive(node.data_dir, min_free_bytes=node.min_free_mb * 1_000_000)
    archive.cleanup_temp()
    service = DicomService(node, archive)
    try:
        service.start()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        shell.stopped(service.state())
        return 1
    shell.ready(f"{node.ae_title} listening on port {node.dicom_port}")
    try:
        shell.serve(state=service.state, healthy=lambda: service.server is not None)
    finally:
        service.stop(grace=max(5.0, min(node.dimse_timeout, 30.0)))
        shell.stopped(service.state())
    return 0
