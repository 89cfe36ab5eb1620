"""Starting `appliance web` and reading its page the way a browser does (headless Chromium)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


@contextmanager
def web_service(config: Path, port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """`appliance web` on `port`, stopped (SIGTERM, exit 0 expected) at the end."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "--config", str(config), "web"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"appliance web exited {proc.returncode}: {log_path.read_text()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no status page after 30 s: {log_path.read_text()}"
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0, f"appliance web exited {code} on SIGTERM: {log_path.read_text()}"


def browse(port: int, path: str = "/") -> str:
    """The page's DOM after Chromium loaded it, as text with the markup stripped of nothing."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={Path('/tmp') / f'chromium-test-{port}'}",
         "--dump-dom", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout


def visible_text(dom: str) -> str:
    """The words a person sees: tags removed, whitespace folded."""
    import html
    import re

    text = re.sub(r"<style.*?</style>", " ", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(html.unescape(text).split())
