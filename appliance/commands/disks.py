"""`appliance disks status|adopt|copy|verify|rebuild|rescan`: the external disks, for a field engineer.

Every expected failure (a read-only or foreign disk, a clone, a disk gone
mid-way) is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys

from appliance.archive import open_archive
from appliance.config import Settings
from appliance.disks.manager import DiskError, DiskManager

TROUBLE = 1  # verify found damage it could not repair, or a link; rebuild failed copies
USAGE = 2


def _gb(n: int | None) -> str:
    from appliance.commands.status import size_text

    return "-" if n is None else size_text(n)


def main(settings: Settings, action: str, label: str | None, role: str | None, pair: int | None,
         as_json: bool, source: str | None = None, force: str | None = None) -> int:
    manager = DiskManager(open_archive(settings), settings.disks)
    try:
        return _act(manager, action, label, role, pair, as_json, source, force)
    except DiskError as exc:
        print(f"appliance disks: {exc}", file=sys.stderr)
        return USAGE
    except OSError as exc:
        print(f"appliance disks {action}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename
                                                                    else ""), file=sys.stderr)
        return TROUBLE


def _act(manager: DiskManager, action: str, label: str | None, role: str | None, pair: int | None,
         as_json: bool, source: str | None, force: str | None) -> int:
    if action == "adopt":
        if not label or not role:
            print("appliance disks adopt LABEL --role primary|mirror|spare", file=sys.stderr)
            return USAGE
        disk = manager.adopt(label, role, pair, force)
        print(f"{disk.label}: adopted as {disk.role}" + (f" of pair {disk.pair}" if disk.pair else ""))
        return 0
    if action == "copy":
        made = manager.copy_round(limit=1_000_000)
        print(f"{made} verified copies made")
        return 0
    if action == "rebuild":
        if not label or not source:
            print("appliance disks rebuild NEW_LABEL --from LABEL", file=sys.stderr)
            return USAGE
        tally = manager.rebuild(label, source)
        print(json.dumps(tally) if as_json else f"{tally['copied']} copied and verified, "
              f"{tally['failed']} failed")
        return TROUBLE if tally["failed"] else 0
    if action == "rescan":
        if not label:
            print("appliance disks rescan LABEL", file=sys.stderr)
            return USAGE
        from appliance.disks.rescan import rescan

        tally = rescan(manager, label)
        keys = ("found", "already_known", "known_other_content", "unreadable", "not_dicom", "links")
        summary = {k: tally.get(k, 0) for k in keys}
        print(json.dumps(summary) if as_json else ", ".join(f"{v} {k}" for k, v in summary.items()))
        return 0
    if action == "verify":
        tally = manager.verify(label)
        problems = tally.pop("problems")
        if as_json:
            print(json.dumps({**tally, "problems": problems}))
        else:
            print(", ".join(f"{v} {k}" for k, v in tally.items()))
        for problem in problems:
            print(f"appliance disks verify: {problem}", file=sys.stderr)
        return TROUBLE if tally["unrepairable"] or tally["links"] or tally["untrusted_disk"] else 0
    return _status(manager, as_json)


def _status(manager: DiskManager, as_json: bool) -> int:
    rows = manager.status()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no disk adopted yet: plug one in and `appliance disks adopt LABEL --role primary`")
    for r in rows:
        where = r["mountpoint"] or "NOT MOUNTED"
        print(f"{r['label']:<14} {r['role']:<8} pair {r['pair']} {r['state'].upper():<9}  {where}  "
              f"{_gb(r['free_bytes'])} free of {_gb(r['total_bytes'])}, {r['instances']} images "
              f"{r['oldest_study_date']}..{r['newest_study_date']}")
        if r["health"] and r["mounted"]:
            print(f"{'':<14} {r['health']}")
    for warning in manager.warnings():
        print(f"WARNING: {warning}")
    return 0
