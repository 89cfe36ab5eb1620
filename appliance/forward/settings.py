"""[forward] and [[destination]]: where the forwarder sends, what, when and how it retries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from appliance.fields import (
    check_ae_title,
    check_name,
    check_nonempty,
    check_not_negative,
    check_port,
    check_positive,
    check_window,
)
from appliance.fields import checked as _checked


def check_accepts(value: tuple[str, ...]) -> str | None:
    from appliance.transcode import syntaxes

    if not value:
        return "list at least one class or syntax (every node takes \"uncompressed\")"
    for entry in value:
        if entry not in syntaxes.CLASSES and syntaxes.resolve(entry) is None:
            return (f"{entry!r} is neither a class (uncompressed, lossless, lossy) nor a transfer "
                    "syntax UID or pydicom keyword")
    return None


@dataclass(frozen=True)
class MatchSettings:
    """Which objects go to a destination; every list given must match, empty = any."""

    modality: tuple[str, ...] = _checked((), None, "Modality values, e.g. [\"CR\", \"DX\"]")
    calling_ae: tuple[str, ...] = _checked((), None, "calling AE titles of the senders")
    sop_class: tuple[str, ...] = _checked((), None, "SOP Class UIDs")
    station_name: tuple[str, ...] = _checked((), None, "Station Name values")
    patient_id: str = _checked("", None, "a glob pattern on Patient ID, e.g. \"H*\"")


@dataclass(frozen=True)
class DestinationSettings:
    """[[destination]]: a PACS or workstation the gateway forwards to."""

    name: str = _checked(dataclasses.MISSING, check_name, "short name used in commands")
    ae_title: str = _checked(dataclasses.MISSING, check_ae_title, "the destination's AE title")
    host: str = _checked(dataclasses.MISSING, check_nonempty, "host name or IP address")
    port: int = _checked(dataclasses.MISSING, check_port, "its DICOM port")
    accepts: tuple[str, ...] = _checked(
        ("uncompressed",), check_accepts, "classes or syntaxes it takes, by preference"
    )
    match: MatchSettings = field(default_factory=MatchSettings, metadata={"doc": "routing rule"})
    max_associations: int = _checked(1, check_positive, "parallel associations to it")
    echo_interval: float = _checked(60.0, check_positive, "seconds between C-ECHO health checks")
    stable_seconds: float = _checked(0.0, check_not_negative, "send a study once no new image of it "
                                     "arrived for this long (0: at once)")
    window: str = _checked("always", check_window, 'when to send: "HH:MM-HH:MM" (may wrap midnight) '
                           'or "always"')


@dataclass(frozen=True)
class ForwardSettings:
    """[forward]: how the forwarder retries."""

    first_backoff_seconds: float = _checked(5.0, check_positive, "first wait after a failure")
    max_backoff_seconds: float = _checked(600.0, check_positive, "longest wait between tries")
    max_attempts: int = _checked(5, check_positive, "tries before an object a destination refuses "
                                 "is marked failed")
    batch_size: int = _checked(200, check_positive, "objects of one study per association at most")
