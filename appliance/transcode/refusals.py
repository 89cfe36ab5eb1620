"""A refused conversion, told once: one WARNING line and one row in the index.

The row (`conversion_refusals`) is what `appliance status` and /metrics
count: the convert and forward services refuse in their own processes, and
the web process reads the index, so a count kept in memory would be seen by
nobody. The line names the object, where the conversion was for, the
target syntax and the reason; never a traceback (a refusal is an expected
outcome of bad input, not a bug).
"""

from __future__ import annotations

import logging
import sqlite3

from appliance.archive.index import Index
from appliance.archive.ingest import now_local
from appliance.transcode.errors import one_line
from appliance.transcode.syntaxes import name_of


def report_refusal(log: logging.Logger, index: Index | None, sop_instance_uid: str, target: str,
                   path: str, reason: object, outcome: str) -> None:
    """Log and count one refusal. `path` is "store" or "forward to <name>"; `outcome` says
    what happens to the object instead ("kept as received", "sent as ...", "not sent")."""
    text = one_line(reason)
    log.warning("%s: conversion to %s for %s refused, %s: %s", one_line(sop_instance_uid, 80),
                name_of(target), path, outcome, text)
    if index is None:
        return
    try:
        with index.transaction() as conn:
            conn.execute("INSERT INTO conversion_refusals (sop_instance_uid, target_syntax, path, reason, "
                         "refused_at) VALUES (?, ?, ?, ?, ?)",
                         (sop_instance_uid, target, path, text[:500],
                          now_local().isoformat(timespec="seconds")))
    except sqlite3.Error as exc:  # the count is advisory: never lose the object over it
        log.error("cannot count the refusal of %s in the index: %s", one_line(sop_instance_uid, 80), exc)


def refusal_counts(index: Index, today: str) -> dict[str, int]:
    """Refusals in all and today (`today` as YYYY-MM-DD), for `appliance status`."""
    total, today_count = index.connection().execute(
        "SELECT COUNT(*), COALESCE(SUM(refused_at >= ?), 0) FROM conversion_refusals", (today,)
    ).fetchone()
    return {"conversions_refused": int(total), "conversions_refused_today": int(today_count)}


__all__ = ["refusal_counts", "report_refusal"]
