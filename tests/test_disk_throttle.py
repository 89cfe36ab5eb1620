"""Copying to the USB disks gives way while images are arriving, and runs at full speed otherwise."""

from __future__ import annotations

from pathlib import Path

from appliance.archive.ingest import Archive
from appliance.config import DisksSettings
from appliance.disks.manager import DiskManager
from appliance.disks.throttle import ArrivalWatch
from tests.conftest import synthetic_ct


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_arrivals_slow_the_copier_until_the_gateway_is_quiet(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "data")
    files = synthetic_ct(tmp_path / "ct", 3, size=32)
    clock = Clock()
    watch = ArrivalWatch(archive.index, quiet_seconds=10.0, clock=clock)
    manager = DiskManager(archive, DisksSettings(pause_ms=40.0))
    manager.receiving = watch
    assert not watch() and manager._pause() == 0.0, "an idle gateway copies at full speed"
    archive.ingest_bytes(files[0].read_bytes())
    clock.now += 0.5
    assert not watch(), "the index is looked at no more than once a second"
    clock.now += 1.0
    assert watch() and manager._pause() == 0.040, "an image arrived: pause between copied files"
    clock.now += 5.0
    archive.ingest_bytes(files[1].read_bytes())
    clock.now += 6.0
    assert watch(), "another arrival keeps the copier slow"
    clock.now += 11.0
    assert not watch() and manager._pause() == 0.0, "quiet for 10 s: full speed again"
    silent = DiskManager(archive, DisksSettings(pause_ms=0.0))
    silent.receiving = lambda: True
    assert silent._pause() == 0.0, "pause_ms = 0 never pauses"
