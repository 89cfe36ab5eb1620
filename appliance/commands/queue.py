"""`appliance queue` and `appliance send`: what is waiting, what failed, and what to do.

    appliance queue [--destination NAME] [--state STATE] [--json]
    appliance queue retry (--all | JOB...)
    appliance queue drop (--failed | JOB...)
    appliance queue pause|resume NAME
    appliance send --to NAME (--study UID | --patient-id ID)
"""

from __future__ import annotations

import datetime as dt
import json
import sys

from appliance.archive.index import Index
from appliance.config import Settings
from appliance.forward.queue import ForwardQueue


def _queue(settings: Settings) -> ForwardQueue | None:
    path = settings.data_dir / "index.sqlite"
    return ForwardQueue(Index(path)) if path.exists() else None


def _known(settings: Settings, name: str) -> bool:
    if any(d.name == name for d in settings.destinations):
        return True
    names = ", ".join(d.name for d in settings.destinations) or "none configured"
    print(f"appliance: no destination named {name!r} in {settings.source} ({names})", file=sys.stderr)
    return False


def _when(epoch: float) -> str:
    if epoch <= 0:
        return "now"
    return dt.datetime.fromtimestamp(epoch).strftime("%H:%M:%S")


def show(settings: Settings, destination: str | None, state: str | None, as_json: bool) -> int:
    queue = _queue(settings)
    jobs = queue.jobs(destination, state) if queue else []
    if as_json:
        for job in jobs:
            print(json.dumps(job))
        return 0
    if queue:
        for d in settings.destinations:
            health = queue.destination(d.name)
            counts = queue.counts().get(d.name, {})
            flags = "paused" if health["paused"] else ("reachable" if health["reachable"] else
                                                       f"UNREACHABLE ({health['last_error']}), next "
                                                       f"try {_when(health['next_try_at'])}")
            summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("pending", "sending", "done", "failed",
                                                                      "dropped"))
            print(f"{d.name} ({d.ae_title}@{d.host}:{d.port}): {flags}; {summary}")
    for job in jobs:
        if job["state"] == "done" and state is None:
            continue
        result = {"pending": f"pending, next attempt {_when(job['next_attempt_at'])}",
                  "sending": "sending", "done": "sent",
                  "failed": f"failed after {job['attempts']} attempt(s): {job['last_status']}",
                  "dropped": f"dropped (last: {job['last_status'] or 'never tried'})"}[job["state"]]
        last = f" (last: {job['last_status']})" if job["state"] == "pending" and job["last_status"] else ""
        print(f"  job {job['id']:>6}  {job['destination']:<12} {job['sop_instance_uid']}  {result}{last}")
    return 0


def retry(settings: Settings, job_ids: list[str], all_failed: bool) -> int:
    queue = _queue(settings)
    if not all_failed and not job_ids:
        print("appliance queue retry: give --all or job numbers", file=sys.stderr)
        return 2
    try:
        ids = None if all_failed else [int(j) for j in job_ids]
    except ValueError:
        print("appliance queue retry: job numbers are integers (see `appliance queue`)", file=sys.stderr)
        return 2
    count = queue.retry(ids) if queue else 0
    print(f"{count} job(s) queued again")
    return 0


def drop(settings: Settings, job_ids: list[str], all_failed: bool) -> int:
    """Give up on jobs: kept in the history as 'dropped', so the queue says what was never sent."""
    if all_failed == bool(job_ids):
        print("appliance queue drop: give --failed or job numbers, not both", file=sys.stderr)
        return 2
    try:
        ids = None if all_failed else [int(j) for j in job_ids]
    except ValueError:
        print("appliance queue drop: job numbers are integers (see `appliance queue`)", file=sys.stderr)
        return 2
    queue = _queue(settings)
    count = queue.drop(ids) if queue else 0
    print(f"{count} job(s) dropped (kept in `appliance queue --state dropped`; "
          "`appliance queue retry JOB` sends one again)")
    return 0 if count or ids is None else 1


def pause(settings: Settings, name: str, paused: bool) -> int:
    queue = _queue(settings)
    if not _known(settings, name) or queue is None:
        return 2
    queue.set_destination(name, paused=int(paused))
    print(f"{name}: {'paused' if paused else 'resumed'}")
    return 0


def send(settings: Settings, name: str, study: str | None, patient_id: str | None) -> int:
    queue = _queue(settings)
    if not _known(settings, name):
        return 2
    if queue is None:
        print("appliance send: the archive is empty", file=sys.stderr)
        return 1
    uids = [row["sop_instance_uid"] for row in queue.index.find(study_instance_uid=study,
                                                                  patient_id=patient_id)]
    if not uids:
        print("appliance send: no archived image matches", file=sys.stderr)
        return 1
    queue.enqueue(uids, name)
    print(f"{len(uids)} image(s) queued for {name}; `appliance queue --destination {name}` shows them")
    return 0
