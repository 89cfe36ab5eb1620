"""[disks]: external USB HDDs in mirror pairs, how often they are looked at and proven."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.fields import check_not_negative, check_positive, check_window
from appliance.fields import checked as _checked


@dataclass(frozen=True)
class DisksSettings:
    """[disks]: external USB HDDs in mirror pairs (the section switches the disks service on)."""

    enabled: bool = _checked(True, None, "false keeps the section but stops the service")
    copy_window: str = _checked("19:00-23:59", check_window, '"HH:MM-HH:MM" or "always"')
    spool_days: int = _checked(30, check_positive, "days an image stays on the internal disk")
    min_free_gb: float = _checked(2.0, check_not_negative, "rotate to the next pair below this")
    pause_ms: float = _checked(5.0, check_not_negative,
                               "pause between copied files while images are arriving")
    round_seconds: float = _checked(10.0, check_positive,
                                    "how often the service looks at every disk and publishes its state")
    verified_within_hours: float = _checked(24.0, check_positive,
                                            "a copy counts for retention when its hash was checked this "
                                            "recently; older ones are read back first")
