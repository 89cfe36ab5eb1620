"""`appliance find`: which images the gateway holds, and where.

Plain output is a table for a person; `--json` prints one JSON object per
instance (JSON Lines), for scripts and for the acceptance checks.

An image whose internal file was removed by retention (two proven external
copies) is still listed: `path` is where it was, `on_internal_disk` is
false, and `disk_copies` says which disks hold this version of it.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from appliance.archive.index import Index
from appliance.config import Settings
from appliance.disks.model import ROOT

FIELDS = (
    "sop_instance_uid", "sop_class_uid", "patient_id", "patient_name", "birth_date", "sex",
    "study_instance_uid", "accession_number", "study_date", "study_time", "study_description",
    "series_instance_uid", "modality", "series_number", "station_name", "instance_number",
    "transfer_syntax_uid", "path", "size", "sha256", "calling_ae", "source",
    "received_at", "arrived_patient_name",
)
STUDY_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


class UsageError(ValueError):
    pass


def check_study_date(value: str | None) -> None:
    if value is not None and (not value or not STUDY_DATE.match(value) or value == "-"):
        raise UsageError(
            f"--study-date {value!r}: use YYYYMMDD, or a range YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-"
        )


def rows(settings: Settings, **criteria: Any) -> list[dict[str, Any]]:
    index_path = settings.data_dir / "index.sqlite"
    if not index_path.exists():
        return []
    found = []
    index = Index(index_path, create=False)
    for row in index.find(**criteria):
        entry = {name: row[name] for name in FIELDS}
        entry["path"] = str(settings.data_dir / row["path"])
        entry["on_internal_disk"] = not row["spool_purged_at"]
        entry["disk_copies"] = [
            {**copy, "path": posixpath.normpath(f"{ROOT}/{copy['path']}")} for copy in index.disk_copies(
                row["sop_instance_uid"], row["sha256"])]
        found.append(entry)
    return found


def main(settings: Settings, as_json: bool, **criteria: Any) -> int:
    check_study_date(criteria.get("study_date"))
    found = rows(settings, **criteria)
    if as_json:
        for entry in found:
            print(json.dumps(entry, ensure_ascii=False))
        return 0
    if not found:
        print("no images match")
        return 0
    print(f"{'date':<8} {'mod':<4} {'patient':<16} {'name':<24} {'sop instance uid':<40} path")
    for e in found:
        where = e["path"] if e["on_internal_disk"] else "on disks " + ", ".join(
            c["label"] for c in e["disk_copies"]) or "NOWHERE"
        print(f"{e['study_date']:<8} {e['modality']:<4} {e['patient_id'][:16]:<16} "
              f"{e['patient_name'][:24]:<24} {e['sop_instance_uid'][:40]:<40} {where}")
    print(f"{len(found)} image(s)")
    return 0
