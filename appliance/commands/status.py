"""`appliance status`: what is running, images today, disk space.

The first thing a field engineer types over SSH. It reads only what the
services publish (their state files under <data_dir>/run) and the index, so
it works whether the services run under systemd or `appliance run`, and
even when they are down.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from appliance.archive.index import Index
from appliance.config import Settings
from appliance.forward.queue import ForwardQueue
from appliance.processes import pid_alive
from appliance.service import state_dir
from appliance.services import SERVICES, enabled_services
from appliance.transcode.refusals import refusal_counts


def service_states(settings: Settings) -> list[dict[str, Any]]:
    """One entry per known service: running, stale (hung), stopped or disabled."""
    enabled = {spec.name for spec in enabled_services(settings)}
    states = []
    for name in SERVICES:
        entry: dict[str, Any] = {"service": name, "enabled": name in enabled, "state": "stopped"}
        path = state_dir(settings) / f"{name}.json"
        try:
            published = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            published = None
        if published:
            entry.update({k: v for k, v in published.items() if k not in ("service", "status")})
            heartbeat = float(published.get("heartbeat_at", 0))
            with suppress(OSError):  # a service that cannot rewrite it (disk full) touches it
                heartbeat = max(heartbeat, path.stat().st_mtime)
            age = time.time() - heartbeat
            entry["heartbeat_age_seconds"] = round(age, 1)
            alive = pid_alive(int(published.get("pid", 0)))
            if published.get("status") == "stopped" or not alive:
                entry["state"] = "stopped"
            elif age > 3 * float(published.get("heartbeat_seconds", 5)):
                entry["state"] = "not responding"
            else:
                entry["state"] = published.get("status", "running")
        elif name not in enabled:
            entry["state"] = "disabled"
        states.append(entry)
    return states


def disk_usage(path: Path) -> dict[str, int]:
    usage = shutil.disk_usage(path)
    return {"total_bytes": usage.total, "used_bytes": usage.used, "free_bytes": usage.free}


def collect(settings: Settings) -> dict[str, Any]:
    data_dir = settings.data_dir
    report: dict[str, Any] = {
        "ae_title": settings.node.ae_title,
        "dicom_port": settings.node.dicom_port,
        "data_dir": str(data_dir),
        "configuration": settings.source,
        "services": service_states(settings),
    }
    index_path = data_dir / "index.sqlite"
    today = dt.date.today()
    report["index_problem"] = ""
    try:
        index = Index(index_path, create=False) if index_path.exists() else None
    except sqlite3.DatabaseError as exc:  # status must still say what it can: the services, the disk
        index, report["index_problem"] = None, f"the index {index_path} cannot be read: {exc}"
    if index is not None:
        try:  # closed at once: the status page calls this on every request, from a new thread
            report["archive"] = index.counts(today.isoformat())
            count, listed = index.patients_with_several_names()
            report["archive"]["patient_ids_with_several_names"] = count
            report["archive"]["several_names"] = listed
            report["archive"].update(refusal_counts(index, today.isoformat()))
            report["forward_failed"] = ForwardQueue(index).failures()  # why each one failed
        except sqlite3.DatabaseError as exc:
            report["index_problem"] = f"the index {index_path} cannot be read: {exc}"
            report.pop("archive", None)
        finally:
            index.close()
    if "archive" not in report:
        report["archive"] = {"instances": 0, "bytes": 0, "instances_today": 0, "bytes_today": 0,
                             "patient_ids_with_several_names": 0, "several_names": [],
                             "conversions_refused": 0, "conversions_refused_today": 0}
    report.setdefault("forward_failed", [])
    quarantine_today = data_dir / "quarantine" / today.strftime("%Y%m%d")
    report["archive"]["rejected_today"] = (
        len(list(quarantine_today.glob("*.dcm"))) if quarantine_today.is_dir() else 0
    )
    report["disk"] = disk_usage(data_dir if data_dir.exists() else data_dir.parent)
    report["disk"]["min_free_bytes"] = settings.node.min_free_mb * 1_000_000
    return report


def size_text(n: float | None) -> str:
    """Bytes as people read them (decimal units, like disk labels): 1.5 GB."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def several_names_warnings(archive: dict[str, Any]) -> list[str]:
    """One line per Patient ID whose images arrived under different names.

    A modality that sends two names for one ID is the first sign of a
    wrong-patient image (a mistyped ID at the console, a worklist mix-up):
    someone should look before the images are read.
    """
    lines = []
    for entry in archive.get("several_names") or []:
        names = ", ".join(f"{n['patient_name']} ({n['arrivals']})" for n in entry["names"])
        lines.append(f"patient ID {entry['patient_id']} arrived under {len(entry['names'])} names: "
                     f"{names}; check for a wrong patient")
    hidden = int(archive.get("patient_ids_with_several_names", 0)) - len(lines)
    if hidden > 0:
        lines.append(f"and {hidden} more patient ID(s) with several names (`appliance status --json`)")
    return lines


def failed_job_text(job: dict[str, Any]) -> str:
    """One failed forward job and why, with what to do about it."""
    return (f"job {job['id']} to {job['destination']} ({job['sop_instance_uid']}) failed after "
            f"{job['attempts']} attempt(s): {job['last_status']}; `appliance queue retry {job['id']}` "
            f"or `appliance queue drop {job['id']}`")


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Gateway {report['ae_title']} on DICOM port {report['dicom_port']}",
        f"  configuration: {report['configuration']}",
        f"  data:          {report['data_dir']}",
        "",
        "Services:",
    ]
    for entry in report["services"]:
        detail = ""
        if entry["state"] in ("running", "unhealthy", "not responding"):
            detail = f"  pid {entry.get('pid')}"
            if "associations" in entry:
                detail += f", {entry['associations']} association(s) open"
            if "backlog" in entry:
                detail += f", {entry['backlog']} object(s) waiting to be stored as {entry.get('format')}"
        lines.append(f"  {entry['service']:<10} {entry['state']}{detail}")
        for name, dest in (entry.get("destinations") or {}).items():
            health = ("paused" if dest.get("paused") else "reachable" if dest.get("reachable")
                      else f"UNREACHABLE: {dest.get('last_error', '')}")
            lines.append(f"    -> {name:<12} {health}; {dest.get('pending', 0)} pending, "
                         f"{dest.get('failed', 0)} failed, {dest.get('done', 0)} sent")
        for disk in entry.get("disks") or []:
            where = disk.get("state") or ("active" if disk.get("active") else
                                          "mounted" if disk.get("mounted") else "missing")
            where = where if where in ("active", "ready") else where.upper()
            health = f"; {disk['health']}" if disk.get("health") and disk.get("mounted") else ""
            lines.append(f"    disk {disk['label']:<12} {disk['role']:<7} pair {disk['pair']} {where}; "
                         f"{disk['instances']} images{health}")
        for warning in entry.get("warnings") or []:
            lines.append(f"    WARNING: {warning}")
    for job in report.get("forward_failed") or []:
        lines.append(f"  FAILED: {failed_job_text(job)}")
    if report.get("index_problem"):
        lines.append(f"  WARNING: {report['index_problem']}")
    archive = report["archive"]
    disk = report["disk"]
    lines += [
        "",
        f"Images today:  {archive['instances_today']} ({size_text(archive['bytes_today'])}), "
        f"rejected today: {archive['rejected_today']}, conversions refused today: "
        f"{archive.get('conversions_refused_today', 0)}",
        f"Archive:       {archive['instances']} images ({size_text(archive['bytes'])})",
        f"Disk:          {size_text(disk['free_bytes'])} free of {size_text(disk['total_bytes'])}",
    ]
    if disk["free_bytes"] < disk["min_free_bytes"]:
        lines.append("  WARNING: free space is below [node] min_free_mb; new images are refused")
    lines += [f"  WARNING: {line}" for line in several_names_warnings(archive)]
    return "\n".join(lines)


NOT_ALL_RUNNING = 3  # as `systemctl status`: scripts can tell something is down


def main(settings: Settings, as_json: bool) -> int:
    """Exit 0 when every enabled service runs, 3 otherwise."""
    report = collect(settings)
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else render(report))
    down = [s for s in report["services"] if s["enabled"] and s["state"] != "running"]
    return NOT_ALL_RUNNING if down else 0
