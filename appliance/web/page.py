"""The status page: one screen a nurse or a field engineer can read at a glance.

Rendered on the server from the same report as `appliance status --json`
(services' state files and the index), so the page, the JSON API and the SSH
command never disagree. No JavaScript: it refreshes itself, and works on the
smallest front-panel display and in any browser a clinic has. Everything
shown is escaped: labels and messages come from disks and peers.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any

from appliance.commands.status import failed_job_text, several_names_warnings, size_text

GOOD_STATES = {"running", "disabled"}


def _date(value: str) -> str:
    """DICOM dates (20261123) as people write them (2026-11-23)."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value


def _bar(used: float, total: float, alert: bool) -> str:
    share = 0.0 if not total else min(max(used / total, 0.0), 1.0)
    kind = "bar alert" if alert else "bar"
    return (f'<div class="{kind}" role="meter" aria-valuenow="{share * 100:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div style="width:{share * 100:.1f}%"></div></div>')


def warnings(report: dict[str, Any]) -> list[str]:
    """Everything that needs a person, from every service, plus the internal disk."""
    found = []
    for service in report["services"]:
        if service["enabled"] and service["state"] not in GOOD_STATES:
            found.append(f"the {service['service']} service is {service['state']}")
        found.extend(service.get("warnings") or [])
        for name, dest in (service.get("destinations") or {}).items():
            if not dest.get("reachable", True) and not dest.get("paused"):
                found.append(f"destination {name} is unreachable: {dest.get('last_error', '')}".rstrip(": "))
            if dest.get("failed"):
                found.append(f"destination {name}: {dest['failed']} image(s) failed; "
                             "`appliance queue retry` sends them again")
    found.extend(failed_job_text(job) for job in report.get("forward_failed") or [])  # why each failed
    disk = report["disk"]
    if disk["free_bytes"] < disk["min_free_bytes"]:
        found.append("the internal disk is full: new images are refused until space is freed")
    found.extend(several_names_warnings(report["archive"]))
    return found


def _services(report: dict[str, Any]) -> str:
    rows = []
    for s in report["services"]:
        state = s["state"]
        kind = "ok" if state in GOOD_STATES else "bad"
        rows.append(f'<tr><td>{escape(s["service"])}</td><td class="{kind}">{escape(state)}</td></tr>')
    return "<h2>Services</h2><table>" + "".join(rows) + "</table>"


def _destinations(report: dict[str, Any]) -> str:
    rows = []
    for service in report["services"]:
        for name, d in (service.get("destinations") or {}).items():
            if d.get("paused"):
                health, kind = "paused", "warn"
            elif d.get("reachable"):
                health, kind = "reachable", "ok"
            else:
                health, kind = "UNREACHABLE", "bad"
            rows.append(f'<tr><td>{escape(name)}</td><td class="{kind}">{health}</td>'
                        f'<td class="n">{d.get("pending", 0)}</td><td class="n">{d.get("failed", 0)}</td>'
                        f'<td class="n">{d.get("done", 0)}</td></tr>')
    if not rows:
        return ""
    return ("<h2>Destinations</h2><table><tr><th>destination</th><th>state</th><th class=\"n\">waiting</th>"
            "<th class=\"n\">failed</th><th class=\"n\">sent</th></tr>" + "".join(rows) + "</table>")


def _disks(report: dict[str, Any]) -> str:
    disks = [d for s in report["services"] for d in (s.get("disks") or [])]
    if not disks:
        return ""
    rows = []
    for d in disks:
        if not d.get("mounted"):
            state, kind = "MISSING", "bad"
        elif d.get("state") not in (None, "active", "ready", "full"):  # untrusted, read-only, failing
            state, kind = f"{escape(d['state']).upper()}: {escape(d.get('health', ''))}", "bad"
        elif d.get("state") == "full":
            state, kind = "full", "ok"
        elif d.get("active"):
            state, kind = "active", "ok"
        else:
            state, kind = "connected", "ok"
        total, free = d.get("total_bytes"), d.get("free_bytes")
        if total:
            capacity = (f"{_bar(total - free, total, free < 0.1 * total)}"
                        f"{size_text(free)} free of {size_text(total)}")
        else:
            capacity = "-"
        dates = ""
        if d.get("oldest_study_date"):
            dates = f"{escape(_date(d['oldest_study_date']))} – {escape(_date(d['newest_study_date']))}"
        pair = f"pair {d['pair']}" if d.get("pair") else "spare"
        rows.append(f'<tr data-label="{escape(d["label"])}"><td>{escape(d["label"])}</td>'
                    f'<td>{escape(d["role"])}, {pair}</td><td class="{kind}">{state}</td>'
                    f'<td class="cap">{capacity}</td><td class="n">{d.get("instances", 0)}</td>'
                    f'<td>{dates}</td></tr>')
    return ("<h2>External disks</h2><table><tr><th>disk</th><th>role</th><th>state</th><th>capacity</th>"
            "<th class=\"n\">images</th><th>study dates</th></tr>" + "".join(rows) + "</table>")


STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:0.6em 1em;background:#fafafa;color:#111}
h1{font-size:1.3em;margin:0.2em 0}h2{font-size:1.05em;margin:1em 0 0.3em}
.banner{padding:0.6em 0.8em;border-radius:6px;font-weight:600;margin:0.4em 0}
.banner.ok{background:#d9f2dc}.banner.bad{background:#fbd9d3}
ul.warnings{margin:0.3em 0;padding-left:1.3em;color:#8a1c0c}
table{border-collapse:collapse;width:100%;max-width:60em}
td,th{text-align:left;padding:0.25em 0.5em;border-bottom:1px solid #ddd;vertical-align:middle}
td.n,th.n{text-align:right}.ok{color:#17692a}.bad{color:#b3261e;font-weight:700}.warn{color:#8a5a00}
.bar{display:inline-block;width:8em;height:0.8em;background:#e4e4e4;border-radius:3px;margin-right:0.5em;
vertical-align:middle}.bar>div{height:100%;background:#3b7dd8;border-radius:3px}
.bar.alert>div{background:#b3261e}footer{color:#666;font-size:0.85em;margin-top:1.2em}
"""


def render(report: dict[str, Any], refresh_seconds: int = 10, now: dt.datetime | None = None) -> str:
    found = warnings(report)
    if found:
        banner = (f'<div class="banner bad" id="state">Needs attention ({len(found)})</div>'
                  '<ul class="warnings">' + "".join(f"<li>{escape(w)}</li>" for w in found) + "</ul>")
    else:
        banner = '<div class="banner ok" id="state">All is well</div>'
    archive, disk = report["archive"], report["disk"]
    internal = (f"<h2>Internal disk</h2><p>{_bar(disk['used_bytes'], disk['total_bytes'], False)}"
                f"{size_text(disk['free_bytes'])} free of {size_text(disk['total_bytes'])}; "
                f"{archive['instances']} images ({size_text(archive['bytes'])}) in the archive</p>")
    today = (f"<h2>Today</h2><p>{archive['instances_today']} images received "
             f"({size_text(archive['bytes_today'])}), {archive['rejected_today']} rejected</p>")
    stamp = (now or dt.datetime.now().astimezone()).strftime("%Y-%m-%d %H:%M:%S")
    title = f"Gateway {report['ae_title']}"
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="refresh" content="{refresh_seconds}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(title)} <small>DICOM port {report['dicom_port']}</small></h1>"
        f"{banner}{today}{internal}{_disks(report)}{_destinations(report)}{_services(report)}"
        f"<footer>updated {stamp}; refreshes every {refresh_seconds} s; "
        '<a href="/api/status">JSON</a> · <a href="/metrics">metrics</a></footer>'
        "</body></html>"
    )
