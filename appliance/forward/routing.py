"""Which destinations an object goes to, decided in the ingest transaction.

Jobs are created in the same transaction as the index row, so an image that
was acked always has its forward jobs: a crash between the two cannot
happen. A replaced instance (same UID, new content) gets its jobs reset to
pending, so the destination receives the new content too.
"""

from __future__ import annotations

import fnmatch
import sqlite3

from appliance.archive.ingest import now_local
from appliance.archive.record import InstanceRecord
from appliance.config import DestinationSettings, MatchSettings


def matches(rule: MatchSettings, record: InstanceRecord, calling_ae: str) -> bool:
    """Every list the rule gives must contain the object's value; empty lists match anything."""
    checks = (
        (rule.modality, record.modality),
        (rule.calling_ae, calling_ae),
        (rule.sop_class, record.sop_class_uid),
        (rule.station_name, record.station_name),
    )
    if any(allowed and value not in allowed for allowed, value in checks):
        return False
    return not rule.patient_id or fnmatch.fnmatchcase(record.patient_id, rule.patient_id)


class ForwardRouter:
    """The ingest hook that queues one job per matching destination."""

    def __init__(self, destinations: tuple[DestinationSettings, ...]) -> None:
        self.destinations = destinations

    def queue_jobs(self, conn: sqlite3.Connection, row: int, record: InstanceRecord) -> None:
        calling_ae = conn.execute("SELECT calling_ae FROM instances WHERE id = ?", (row,)).fetchone()[0]
        stamp = now_local().isoformat(timespec="seconds")
        for destination in self.destinations:
            if not matches(destination.match, record, calling_ae):
                continue
            conn.execute(
                """INSERT INTO forward_jobs (sop_instance_uid, destination, created_at, updated_at)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT(sop_instance_uid, destination) DO UPDATE SET
                     state = 'pending', attempts = 0, next_attempt_at = 0, last_status = '',
                     updated_at = excluded.updated_at""",
                (record.sop_instance_uid, destination.name, stamp, stamp),
            )
