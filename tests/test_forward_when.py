"""When to send, per destination: within a time window, or once a study is stable."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

import pydicom

from tests.conftest import (
    STORESCP,
    dcmtk_env,
    free_port,
    run_cli,
    storescu,
    synthetic_ct,
    wait_for,
    write_config,
)
from tests.test_forward import Forwarder, _destination, _gateway, _jobs
from tests.test_send import _listening


def _storescp(out: Path) -> tuple[subprocess.Popen, int]:
    out.mkdir()
    port = free_port()
    process = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(out), str(port)], env=dcmtk_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _listening(port), 10, "storescp")
    return process, port


def _hhmm(moment: dt.datetime) -> str:
    return moment.strftime("%H:%M")


def test_a_destination_outside_its_window_waits(make_appliance, tmp_path: Path) -> None:
    """Two destinations on one storescp: the one whose window is now sends, the other holds its jobs
    (no attempt counted, the destination still reachable)."""
    now = dt.datetime.now()
    scp, port = _storescp(tmp_path / "out")
    try:
        minutes = dt.timedelta(minutes=1)
        open_now = f'window = "{_hhmm(now - 5 * minutes)}-{_hhmm(now + 30 * minutes)}"'
        later = f'window = "{_hhmm(now + 120 * minutes)}-{_hhmm(now + 180 * minutes)}"'
        gateway = _gateway(make_appliance, _destination("day", "PACS", port, extra=open_now)
                           + _destination("night", "PACS", port, extra=later))
        assert storescu(gateway.port, synthetic_ct(tmp_path / "ct", 1, size=32)).returncode == 0
        forwarder = Forwarder(gateway)
        try:
            wait_for(lambda: len(list((tmp_path / "out").iterdir())) == 1, 30, "the day destination's copy")
            time.sleep(2)
        finally:
            forwarder.stop()
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    jobs = {job["destination"]: job for job in _jobs(gateway)}
    assert jobs["day"]["state"] == "done"
    assert (jobs["night"]["state"], jobs["night"]["attempts"]) == ("pending", 0)
    assert len(list((tmp_path / "out").iterdir())) == 1
    assert "UNREACHABLE" not in gateway.cli("queue").stdout


def test_a_study_goes_once_stable(make_appliance, tmp_path: Path) -> None:
    """stable_seconds = 3: a study whose images trickle in leaves only 3 s after its last image,
    all of it together."""
    scp, port = _storescp(tmp_path / "out")
    out = tmp_path / "out"
    try:
        gateway = _gateway(make_appliance, _destination("pacs", "PACS", port, extra="stable_seconds = 3"))
        files = synthetic_ct(tmp_path / "ct", 2, size=32)
        forwarder = Forwarder(gateway)
        try:
            assert storescu(gateway.port, files[:1]).returncode == 0
            time.sleep(2)
            assert list(out.iterdir()) == [], "sent before the study was stable"
            assert storescu(gateway.port, files[1:]).returncode == 0
            last = time.monotonic()
            time.sleep(2)
            assert list(out.iterdir()) == [], "the second image restarts the wait"
            wait_for(lambda: len(list(out.iterdir())) == 2, 30, "the whole study")
            assert time.monotonic() - last >= 2.9
        finally:
            forwarder.stop()
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()} == {
        pydicom.dcmread(f).SOPInstanceUID for f in files}


def test_a_bad_window_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "a.toml", {"data_dir": str(tmp_path / "d")})
    with open(config, "a", encoding="utf-8") as fp:
        fp.write(_destination("pacs", "PACS", 104, extra='window = "tonight"'))
    result = run_cli(config, "config", "check", check=False)
    assert result.returncode == 2 and "window" in result.stderr and "HH:MM-HH:MM" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
