"""The status page, its JSON and /metrics, read by headless Chromium and by a scraper."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from tests.conftest import TEST_FILES, free_port, storescu, write_config
from tests.web_helpers import browse, visible_text, web_service


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_page_shows_images_today_and_a_stopped_service(make_appliance, tmp_path: Path) -> None:
    gateway = make_appliance()
    assert storescu(gateway.port, [TEST_FILES / "CT_small.dcm"]).returncode == 0
    port = free_port()
    config = write_config(tmp_path / "web.toml", {**gateway.node}, web_port=port)
    with web_service(config, port, tmp_path / "web.log"):
        page = visible_text(browse(port))
        assert "Gateway GATEWAY" in page
        assert "All is well" in page, page
        assert "1 images received" in page and "0 rejected" in page
        assert "dicom running" in page and "web running" in page

        status, kind, body = _get(port, "/api/status")
        report = json.loads(body)
        assert status == 200 and kind.startswith("application/json")
        assert report["archive"]["instances_today"] == 1 and report["warnings"] == []

        status, kind, body = _get(port, "/metrics")
        assert status == 200 and kind.startswith("text/plain")
        assert "appliance_archive_images 1.0" in body
        assert 'appliance_service_up{service="dicom"} 1.0' in body

        gateway.stop()  # the receiver goes down: the page must say so at once
        page = visible_text(browse(port))
        assert "Needs attention (1)" in page and "the dicom service is stopped" in page
        assert 'appliance_service_up{service="dicom"} 0.0' in _get(port, "/metrics")[2]
        assert _get(port, "/nothing-here")[0] == 404


def test_page_escapes_what_it_did_not_write() -> None:
    from appliance.web.page import render

    hostile = "<script>alert(1)</script>"
    report = {
        "ae_title": "GW", "dicom_port": 104,
        "services": [{"service": "disks", "enabled": True, "state": "running",
                      "warnings": [f"pair 1 is degraded: {hostile} MISSING"],
                      "disks": [{"label": hostile, "role": "primary", "pair": 1, "mounted": False,
                                 "instances": 3}]}],
        "archive": {"instances": 3, "bytes": 10, "instances_today": 0, "bytes_today": 0, "rejected_today": 0},
        "disk": {"total_bytes": 100, "used_bytes": 50, "free_bytes": 50, "min_free_bytes": 1},
    }
    html = render(report)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "MISSING" in html and "Needs attention (1)" in html


def test_web_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "a.toml", {"data_dir": str(tmp_path / "d")}, web_port=port)
        result = subprocess.run([sys.executable, "-m", "appliance", "--config", str(config), "web"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr and "[web] port" in result.stderr


def test_page_keeps_no_descriptors_per_request(tmp_path: Path) -> None:
    """A front panel polled every few seconds for months must not run out of file descriptors."""
    import os

    port = free_port()
    config = write_config(tmp_path / "web.toml", {"data_dir": str(tmp_path / "data"),
                                                   "bind_address": "127.0.0.1"}, web_port=port)
    from tests.conftest import run_cli

    run_cli(config, "import", str(TEST_FILES / "CT_small.dcm"))
    with web_service(config, port, tmp_path / "web.log") as proc:
        def open_index_files() -> int:
            fds = Path(f"/proc/{proc.pid}/fd")
            return sum(1 for fd in fds.iterdir() if "index.sqlite" in os.readlink(fd))

        most = 0
        for n in range(100):
            assert _get(port, "/api/status" if n % 2 else "/metrics")[0] == 200
            most = max(most, open_index_files())
    assert most <= 2, f"{most} index files held open between requests"
