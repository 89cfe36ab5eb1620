"""`appliance disks` without a subcommand: the disk service.

In the copy window it fills the active pair, a batch at a time, pausing
between files while images are arriving (receiving must not suffer) and at
low CPU and I/O priority; at any time it removes from the
internal spool what is old enough and safely on two external disks, and it
publishes every disk's state for `appliance status` and the status page.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

from appliance.config import Settings
from appliance.disks.manager import DiskManager
from appliance.disks.window import in_window
from appliance.service import start_with_archive

log = logging.getLogger("appliance.disks")
PURGE_EVERY_SECONDS = 600.0


def _lower_priority() -> None:
    """Give way to the receiver for CPU and for the disks (the unit file says the same)."""
    try:
        os.nice(10)
    except OSError as exc:
        log.info("could not lower the CPU priority: %s", exc)
    ionice = shutil.which("ionice")
    if ionice:  # idle class: the copier reads the internal disk only when nobody else does
        subprocess.run([ionice, "-c", "3", "-p", str(os.getpid())], capture_output=True, timeout=10,
                       check=False)


def run(settings: Settings) -> int:
    started = start_with_archive("disks", settings)
    if started is None:
        return 1
    shell, archive = started
    manager = DiskManager(archive, settings.disks)
    _lower_priority()
    shell.ready(f"copy window {settings.disks.copy_window}")
    copied, last_purge = 0, 0.0
    while not shell.stopping.is_set():
        busy = False
        try:
            if in_window(settings.disks.copy_window):
                made = manager.copy_round(stop=shell.stopping.is_set)
                copied += made
                busy = made > 0
            if time.monotonic() - last_purge > PURGE_EVERY_SECONDS:
                manager.purge_spool()
                last_purge = time.monotonic()
            shell.write_state({"disks": manager.status(), "warnings": list(manager.warnings()),
                               "copied": copied, "retention": manager.last_retention})
        except Exception:  # a disk that vanishes mid-way must not end the service
            log.exception("disk round failed; trying again in %.0f s", settings.disks.round_seconds)
        if not busy:
            shell.stopping.wait(settings.disks.round_seconds)
    shell.stopped({"copied": copied})
    return 0
