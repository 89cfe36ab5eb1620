"""The small shell every daemon of the appliance runs in.

One place decides how a service logs, tells systemd it is ready and alive,
reports its state for `appliance status`, and stops on SIGTERM. A service
body only does its job:

    shell = ServiceShell("dicom", settings)
    ... start serving ...
    shell.ready("listening on 11112")
    shell.serve(state=lambda: {...})      # returns when SIGTERM/SIGINT arrives
    ... finish in-flight work, close ...

Under systemd, logs go to the journal and READY/WATCHDOG go through
systemd-python; on a desk (or without systemd-python) logs go to stderr and
notifications fall back to the raw $NOTIFY_SOCKET protocol, or to nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.archive import durable
from appliance.config import Settings

log = logging.getLogger("appliance.service")

HEARTBEAT_SECONDS = 5.0


def under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def setup_logging(name: str, level: str = "INFO") -> None:
    """Journal under systemd, stderr otherwise; one format for every service."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler | None = None
    if under_systemd():
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]

            handler = JournalHandler(SYSLOG_IDENTIFIER=f"appliance-{name}")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; keep its warnings, drop its chatter.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def notify(message: str) -> bool:
    """sd_notify: systemd-python when installed, else the raw socket protocol."""
    try:
        from systemd import daemon  # type: ignore[import-not-found]

        return bool(daemon.notify(message))
    except ImportError:
        pass
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode("utf-8"), address)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None if not watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def state_dir(settings: Settings) -> Path:
    return settings.data_dir / "run"


class ServiceShell:
    """Logging, readiness, watchdog, state file and signals for one service."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.stopping = threading.Event()
        self.started_at = time.time()
        setup_logging(name, settings.node.log_level)
        self.state_file = state_dir(settings) / f"{name}.json"
        durable.make_dirs_durable(self.state_file.parent)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("%s service starting (pid %d, configuration: %s)", name, os.getpid(),
                 settings.source)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping.is_set():
            log.info("%s received: finishing in-flight work, then stopping",
                     signal.Signals(signum).name)
        self.stopping.set()

    def ready(self, status: str) -> None:
        notify(f"READY=1\nSTATUS={status}")
        log.info("%s ready: %s", self.name, status)

    def write_state(self, state: dict[str, Any], status: str = "running") -> None:
        """The file `appliance status` reads: who we are and how we are doing."""
        document = {
            "service": self.name,
            "pid": os.getpid(),
            "status": status,
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
            "heartbeat_seconds": HEARTBEAT_SECONDS,
            **state,
        }
        temp = self.state_file.with_suffix(f".{os.getpid()}.tmp")
        try:
            temp.write_text(json.dumps(document, default=str), encoding="utf-8")
            os.replace(temp, self.state_file)
        except OSError as exc:  # a full disk must not stop the service itself
            log.debug("cannot write state file %s: %s", self.state_file, exc)
            # Still prove we are alive: touching the existing state file needs
            # no free block, and `appliance status` takes its mtime as a heartbeat.
            with contextlib.suppress(OSError):
                temp.unlink()
            with contextlib.suppress(OSError):
                self.state_file.touch()

    def serve(self, state: Callable[[], dict[str, Any]], healthy: Callable[[], bool] = lambda: True) -> None:
        """Block until asked to stop, heartbeating the state file and the watchdog."""
        interval = min(HEARTBEAT_SECONDS, watchdog_interval() or HEARTBEAT_SECONDS)
        while True:
            ok = healthy()
            self.write_state(state(), "running" if ok else "unhealthy")
            if ok:
                notify("WATCHDOG=1")
            if self.stopping.wait(interval):
                break
        notify("STOPPING=1")

    def stopped(self, state: dict[str, Any]) -> None:
        self.write_state(state, "stopped")
        log.info("%s service stopped", self.name)


def start_with_archive(name: str, settings: Settings) -> tuple[ServiceShell, Any] | None:
    """The shell and the archive every data service starts with; None (logged) if
    the data directory cannot be used, so the service exits 1 with one line."""
    from appliance.archive import open_archive

    try:
        shell = ServiceShell(name, settings)
        return shell, open_archive(settings)
    except (OSError, sqlite3.Error) as exc:
        logging.getLogger(f"appliance.{name}").error(
            "cannot use data_dir %s: %s; check [node] data_dir, the disk and its permissions",
            settings.data_dir, exc)
        return None
