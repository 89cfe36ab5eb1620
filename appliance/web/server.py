"""`appliance web`: the status page on the front-panel port, the JSON API and /metrics.

Read-only and stateless: every request builds the report afresh from the
services' state files and the index (a few milliseconds), so the page
works whichever services are up, and a crash of the page touches nothing.
The standard library's threading HTTP server is enough for a front panel
and a monitoring scraper; nothing here needs a framework.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from appliance.commands.status import collect
from appliance.config import Settings
from appliance.service import ServiceShell
from appliance.web import metrics, page

log = logging.getLogger("appliance.web")


def _handler(settings: Settings) -> type[BaseHTTPRequestHandler]:
    class StatusHandler(BaseHTTPRequestHandler):
        server_version = "gateway-appliance"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path in ("/", "/index.html"):
                    body = page.render(collect(settings), settings.web.refresh_seconds).encode()
                    self._send(HTTPStatus.OK, "text/html; charset=utf-8", body)
                elif path == "/api/status":
                    report = collect(settings)
                    report["warnings"] = page.warnings(report)
                    body = json.dumps(report, indent=2, ensure_ascii=False).encode()
                    self._send(HTTPStatus.OK, "application/json; charset=utf-8", body)
                elif path == "/metrics":
                    self._send(HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8",
                               metrics.exposition(lambda: collect(settings)))
                else:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8",
                               b"not found: the status page is /, the JSON is /api/status\n")
            except Exception as exc:  # a broken index must give a page that says so, not a hang
                log.exception("status page failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8",
                           f"the status could not be read: {exc}\nsee `appliance status` over SSH\n".encode())

        def do_HEAD(self) -> None:
            self.do_GET()

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return StatusHandler


class StatusServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def run(settings: Settings) -> int:
    shell = ServiceShell("web", settings)
    try:
        server = StatusServer((settings.web.bind_address, settings.web.port), _handler(settings))
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s; is another program using it? change [web] port",
                  settings.web.bind_address, settings.web.port, exc)
        return 1
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    shell.ready(f"status page on http://{settings.web.bind_address}:{settings.web.port}/")
    url = {"url": f"http://{settings.web.bind_address}:{settings.web.port}/"}
    shell.serve(lambda: url)
    server.shutdown()
    server.server_close()
    shell.stopped(url)
    return 0
