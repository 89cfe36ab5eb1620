"""The service shell and `appliance run`: readiness, watchdog, clean stop, restarts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, STORESCU, echo, free_port, synthetic_ct, wait_for, write_config


def test_sd_notify_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    """READY=1 once listening, WATCHDOG=1 at half of WatchdogSec, STOPPING=1 on SIGTERM."""
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(0.2)
    port = free_port()
    config = write_config(tmp_path / "a.toml", {"dicom_port": port, "data_dir": str(tmp_path / "data"),
                                                 "bind_address": "127.0.0.1"})
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "--config", str(config), "dicom"],
                            env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    messages: list[str] = []

    def receive(seconds: float, until: str | None = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until and any(until in m for m in messages)):
            with contextlib.suppress(TimeoutError):
                messages.append(listener.recv(4096).decode())
        if until:
            assert any(until in m for m in messages), f"no {until} in {messages}"

    try:
        receive(20, until="READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"port {port}" in ready  # STATUS= says what it is doing
        assert echo(port) == 0, "READY must mean the port answers"
        start = len(messages)
        receive(2.2)  # WatchdogSec=1 s: a ping every 0.5 s
        assert sum("WATCHDOG=1" in m for m in messages[start:]) >= 3, messages
        proc.send_signal(signal.SIGTERM)
        receive(20, until="STOPPING=1")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    stderr = proc.stderr.read()
    assert "SIGTERM received" in stderr and "dicom service stopped" in stderr


def test_sigterm_finishes_the_association_in_flight(make_appliance, tmp_path: Path) -> None:
    files = synthetic_ct(tmp_path / "ct", 150, size=256)
    gateway = make_appliance()
    sender = subprocess.Popen(
        [STORESCU, "-aec", "GATEWAY", "-v", "127.0.0.1", str(gateway.port), *map(str, files)],
        env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    archive = gateway.data_dir / "archive"
    wait_for(lambda: sum(1 for _ in archive.rglob("*.dcm")) >= 10, 30, "first images")
    gateway.process.send_signal(signal.SIGTERM)
    output, _ = sender.communicate(timeout=120)
    assert gateway.process.wait(timeout=60) == 0
    assert sender.returncode == 0, output
    assert output.count("Received Store Response (Success)") == 150
    assert echo(gateway.port) != 0, "a stopped service must not accept new associations"
    gateway.start()
    assert len(gateway.find()) == 150


def _state(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / "run" / "dicom.json").read_text())
    except (OSError, ValueError):
        return {}


def test_appliance_run_restarts_a_dead_service_and_stops_all(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "a.toml", {"dicom_port": port, "data_dir": str(data_dir),
                                                 "bind_address": "127.0.0.1"})
    supervisor = subprocess.Popen([sys.executable, "-m", "appliance", "--config", str(config), "run"],
                                  cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: echo(port) == 0, 30, "the DICOM service under appliance run")
        first = wait_for(lambda: _state(data_dir).get("pid"), 10, "state file")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _state(data_dir).get("pid") not in (None, first) and echo(port) == 0, 30,
                  "the restarted DICOM service")
        second = _state(data_dir)["pid"]
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "appliance", "--config", str(config), "status", "--json"],
            cwd=REPO, capture_output=True, text=True, check=True).stdout)
        assert status["services"][0]["state"] == "running"
        assert status["services"][0]["pid"] == second
        supervisor.send_signal(signal.SIGINT)
        assert supervisor.wait(timeout=60) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    stderr = supervisor.stderr.read()
    assert "dicom service exited with code -9; restarting" in stderr
    assert "all services stopped" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
    assert echo(port) != 0
    stopped = subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), "status", "--json"],
        cwd=REPO, capture_output=True, text=True)
    assert stopped.returncode == 3, "status must tell scripts that a service is down"
    assert json.loads(stopped.stdout)["services"][0]["state"] == "stopped"


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "a.toml", {"dicom_port": port, "data_dir": str(tmp_path / "d"),
                                                     "bind_address": "127.0.0.1"})
        result = subprocess.run([sys.executable, "-m", "appliance", "--config", str(config), "dicom"],
                                cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
