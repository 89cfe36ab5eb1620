"""Which daemons make up the appliance, and which of them a configuration enables.

`appliance run` (a developer's desk) and the systemd units (the appliance
image) both start services from this table, so a new daemon is one entry here
plus its section in the configuration file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.config import Settings


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    description: str
    enabled: Callable[[Settings], bool]
    main: Callable[[Settings], int]


def _dicom_main(settings: Settings) -> int:
    from appliance.dicom.service import run

    return run(settings)


def _convert_main(settings: Settings) -> int:
    from appliance.transcode.service import run

    return run(settings)


def _forward_main(settings: Settings) -> int:
    from appliance.forward.service import run

    return run(settings)


def _disks_main(settings: Settings) -> int:
    from appliance.disks.service import run

    return run(settings)


def _web_main(settings: Settings) -> int:
    from appliance.web.server import run

    return run(settings)


SERVICES: dict[str, ServiceSpec] = {
    "dicom": ServiceSpec(
        "dicom", "Verification and Storage SCP into the archive", lambda s: True, _dicom_main
    ),
    "convert": ServiceSpec(
        "convert", "stores objects in [storage] format, after the ack",
        lambda s: s.storage.format != "as-received", _convert_main,
    ),
    "forward": ServiceSpec(
        "forward", "sends every object to the destinations whose rules match",
        lambda s: bool(s.destinations), _forward_main,
    ),
    "disks": ServiceSpec(
        "disks", "copies to the external disk pairs, verifies, frees the spool",
        lambda s: s.disks.enabled, _disks_main,
    ),
    "web": ServiceSpec(
        "web", "the front-panel status page, /api/status and /metrics",
        lambda s: s.web.enabled, _web_main,
    ),
}


def enabled_services(settings: Settings) -> list[ServiceSpec]:
    return [spec for spec in SERVICES.values() if spec.enabled(settings)]
