"""`appliance run`: every enabled service as a child process, kept alive.

On the appliance image systemd does this job (one unit per service). On a
developer's desk, and in `make run`, this small supervisor does the same:
each service is a separate process, so a crash of one never stops another;
a service that dies is restarted with a growing pause; Ctrl-C or SIGTERM
stops them all, each finishing its in-flight work first.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from appliance.config import CONFIG_ENV, Settings
from appliance.service import setup_logging
from appliance.services import ServiceSpec, enabled_services

log = logging.getLogger("appliance.supervisor")

STOP_GRACE_SECONDS = 40.0
MAX_BACKOFF_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0


@dataclass
class Child:
    spec: ServiceSpec
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 1.0
    next_start: float = field(default=0.0)


class Supervisor:
    def __init__(self, settings: Settings, config_path: str | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.stopping = threading.Event()
        self.children = [Child(spec) for spec in enabled_services(settings)]

    def _command(self, spec: ServiceSpec) -> list[str]:
        return [sys.executable, "-m", "appliance", spec.name]

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.config_path:
            env[CONFIG_ENV] = os.path.abspath(self.config_path)
        return env

    def _start(self, child: Child) -> None:
        log.info("starting %s service", child.spec.name)
        child.process = subprocess.Popen(self._command(child.spec), env=self._environment())
        child.started = time.monotonic()

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.process is None:
            if now >= child.next_start:
                self._start(child)
            return
        code = child.process.poll()
        if code is None:
            if now - child.started > STABLE_AFTER_SECONDS:
                child.backoff = 1.0
            return
        child.process = None
        child.restarts += 1
        child.next_start = now + child.backoff
        log.error(
            "%s service exited with code %s; restarting in %.0f s (restart #%d)",
            child.spec.name, code, child.backoff, child.restarts,
        )
        child.backoff = min(child.backoff * 2, MAX_BACKOFF_SECONDS)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping.set()

    def run(self) -> int:
        setup_logging("supervisor", self.settings.node.log_level)
        if not self.children:
            log.error("no service is enabled in %s", self.settings.source)
            return 1
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        names = ", ".join(c.spec.name for c in self.children)
        log.info("supervising %s (configuration: %s, data in %s)", names,
                 self.settings.source, self.settings.data_dir)
        while not self.stopping.is_set():
            for child in self.children:
                self._check(child)
            self.stopping.wait(0.5)
        self._stop_all()
        return 0

    def _stop_all(self) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        log.info("stopping %d service(s)", len(running))
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("service pid %d did not stop in %.0f s; killing it", process.pid,
                          STOP_GRACE_SECONDS)
                process.kill()
                process.wait()
        log.info("all services stopped")
