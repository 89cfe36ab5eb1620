"""`appliance dicom`: the DICOM receiver as a service."""

from __future__ import annotations

import logging

from appliance.archive.reconcile import BackgroundCheck
from appliance.config import Settings
from appliance.dicom.commitment import Commitment
from appliance.dicom.scp import DicomService
from appliance.service import start_with_archive

log = logging.getLogger("appliance.dicom")


def run(settings: Settings) -> int:
    node = settings.node
    started = start_with_archive("dicom", settings)
    if started is None:
        return 1
    shell, archive = started
    try:
        archive.cleanup_temp()
    except OSError as exc:
        log.error("cannot clean %s: %s", archive.temp_dir, exc)
        return 1
    archive.on_conflict = settings.storage.on_conflict
    commitment = Commitment(archive, node.ae_title, settings.peers, settings.storage.commit_requires,
                            settings.disks.verified_within_hours)
    service = DicomService(node, archive, known=settings.peers, commitment=commitment)
    try:
        service.start()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        shell.stopped(service.state())
        return 1
    shell.ready(f"{node.ae_title} listening on port {node.dicom_port}")
    checker = BackgroundCheck(archive)  # files without index rows re-indexed, missing files reported
    checker.start()

    def state() -> dict[str, object]:
        problem = service.index_problem or checker.index_problem
        published = {**service.state(), **checker.state()}
        if service.index_problem:
            published["warnings"] = [service.index_problem, *published["warnings"]]
        return {**published, "index_problem": problem}

    try:
        shell.serve(state=state, healthy=lambda: service.listening and not (service.index_problem or
                                                                             checker.index_problem))
    finally:
        service.stop(grace=max(5.0, min(node.dimse_timeout, 30.0)))
        shell.stopped(service.state())
    return 0
