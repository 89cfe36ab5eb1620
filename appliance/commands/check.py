"""`appliance check [--verify] [--json]`: fsck for the archive.

Files in the tree without an index row are re-indexed through the archive's
door (their forward jobs and conversions queued as if just received); index
rows whose file is gone are reported; `--verify` reads every file and
compares it with the checksum in the index. The dicom service runs the same
check, without `--verify`, at every start.

Exit codes: 0 nothing wrong (files re-indexed count as repaired), 1 problems
found (listed), 2 the index cannot be read.
"""

from __future__ import annotations

import json
import sqlite3
import sys

from appliance.archive import open_archive
from appliance.archive.reconcile import check
from appliance.config import Settings


def main(settings: Settings, verify: bool, as_json: bool) -> int:
    index = settings.data_dir / "index.sqlite"
    try:
        report = check(open_archive(settings), verify=verify)
    except sqlite3.Error as exc:
        print(f"appliance check: the index {index} cannot be read: {exc}; restore it from a backup, or "
              "move it aside and run `appliance check` to rebuild it from the archive (every image "
              "is then queued for its destinations again)", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"appliance check: cannot read the archive in {settings.data_dir}: {exc}", file=sys.stderr)
        return 2
    problems = report.problems()
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        for path in report.reindexed:
            print(f"re-indexed  {path}")
        for entry in report.duplicates:
            print(f"duplicate   {entry}")
        for line in problems:
            print(f"PROBLEM     {line}")
        checked = f", {report.verified} checksum(s) verified" if verify else ""
        print(f"{report.files} file(s), {report.rows} index row(s) before the check: "
              f"{len(report.reindexed)} re-indexed, {len(report.missing)} missing, "
              f"{len(report.unreadable)} unreadable, {len(report.corrupt)} corrupt{checked}")
    return 1 if problems else 0
