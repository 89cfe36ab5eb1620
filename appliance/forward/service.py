"""`appliance forward`: the forwarder as a service (enabled by [[destination]] sections)."""

from __future__ import annotations

import logging

from appliance.config import Settings
from appliance.forward.forwarder import Forwarder
from appliance.forward.queue import ForwardQueue
from appliance.service import start_with_archive

log = logging.getLogger("appliance.forward")


def run(settings: Settings) -> int:
    started = start_with_archive("forward", settings)
    if started is None:
        return 1
    shell, archive = started
    queue = ForwardQueue(archive.index)
    resumed = queue.recover()
    if resumed:
        log.warning("%d object(s) were on the wire when the forwarder stopped: sending them again "
                    "(the destination may receive them twice)", resumed)
    forwarder = Forwarder(settings, queue)
    forwarder.start()
    names = ", ".join(d.name for d in settings.destinations)
    shell.ready(f"forwarding to {names}")

    def state() -> dict[str, object]:
        return {"destinations": {d.name: {**queue.counts().get(d.name, {}),
                                          **{k: v for k, v in queue.destination(d.name).items()
                                             if k != "name"}}
                                 for d in settings.destinations},
                "sent": sum(w.sent for w in forwarder.workers)}

    try:
        shell.serve(state=state, healthy=lambda: all(w.is_alive() for w in forwarder.workers))
    finally:
        forwarder.stop()
        shell.stopped(state())
    return 0
