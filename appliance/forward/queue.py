"""The durable forward queue: one row per (instance, destination), in the index.

States: pending (waiting for its next attempt time), sending (on the wire
right now), done (the destination acked it), failed (refused too often; a
field engineer retries it), dropped (a field engineer gave up on it: kept
in the history with its last status, never sent again unless retried).
A crash leaves sending rows behind: at start they go back to pending and
are counted as possible duplicates (the destination may have stored them
before the crash: at least once).
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from appliance.archive.index import Index
from appliance.archive.ingest import now_local

SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings


def backoff(failures: int, first: float, cap: float) -> float:
    """Exponential, capped, with jitter so many jobs (or gateways) do not retry in step."""
    delay = min(cap, first * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.8, 1.0)


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    path: str | None  # None when the instance is no longer in the archive
    study_instance_uid: str
    attempts: int


class ForwardQueue:
    def __init__(self, index: Index) -> None:
        self.index = index

    def _stamp(self) -> str:
        return now_local().isoformat(timespec="seconds")

    def recover(self) -> int:
        """Jobs left 'sending' by a crash go back to pending, counted as possible duplicates."""
        with self.index.transaction() as conn:
            return conn.execute(
                "UPDATE forward_jobs SET state = 'pending', possible_duplicates = possible_duplicates + 1, "
                "next_attempt_at = 0 WHERE state = 'sending'"
            ).rowcount

    def claim_study(self, destination: str, limit: int, stable_seconds: float = 0.0) -> list[Job]:
        """Mark the ready jobs of one study 'sending' and return them (oldest study first).

        With `stable_seconds`, only a study none of whose images arrived in the
        last `stable_seconds` is claimed: a study still arriving waits, the
        others go. (received_at carries its UTC offset: julianday compares
        instants, whatever the local time did.)
        """
        now = time.time()
        ready = self.index.connection().execute(  # a read first: an idle poll takes no write lock
            "SELECT 1 FROM forward_jobs WHERE destination = ? AND state = 'pending' AND next_attempt_at <= ? "
            "LIMIT 1", (destination, now)).fetchone()
        if ready is None:
            return []
        joins = """FROM forward_jobs j
                   LEFT JOIN instances i ON i.sop_instance_uid = j.sop_instance_uid
                   LEFT JOIN series se ON se.id = i.series_ref
                   LEFT JOIN studies st ON st.id = se.study_ref
                   WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ?"""
        args: tuple = (destination, now)
        if stable_seconds > 0:
            joins += """ AND (st.id IS NULL OR NOT EXISTS (
                         SELECT 1 FROM series s2 JOIN instances i2 ON i2.series_ref = s2.id
                         WHERE s2.study_ref = st.id AND julianday(i2.received_at) > julianday(?)))"""
            settled = dt.datetime.fromtimestamp(now - stable_seconds, dt.UTC)
            args += (settled.isoformat(timespec="milliseconds"),)
        first = self.index.connection().execute(  # still a read: a study still arriving costs no lock
            f"SELECT COALESCE(st.study_instance_uid, '') {joins} ORDER BY j.id LIMIT 1", args).fetchone()
        if first is None:
            return []
        with self.index.transaction() as conn:
            rows = conn.execute(
                f"""SELECT j.id, j.sop_instance_uid, i.path, COALESCE(st.study_instance_uid, ''), j.attempts
                    {joins} AND COALESCE(st.study_instance_uid, '') = ? ORDER BY j.id LIMIT ?""",
                (*args, first[0], limit),
            ).fetchall()
            conn.executemany("UPDATE forward_jobs SET state = 'sending', updated_at = ? WHERE id = ?",
                             [(self._stamp(), row[0]) for row in rows])
        return [Job(*row) for row in rows]

    def done(self, job: Job, status: str) -> None:
        with self.index.transaction() as conn:
            conn.execute("UPDATE forward_jobs SET state = 'done', last_status = ?, "
                         "sent_count = sent_count + 1, updated_at = ? WHERE id = ?",
                         (status, self._stamp(), job.id))

    def refused(self, job: Job, status: str, max_attempts: int, first: float, cap: float) -> str:
        """The destination answered with a failure: retry later, or fail after max_attempts."""
        attempts = job.attempts + 1
        state = "failed" if attempts >= max_attempts else "pending"
        with self.index.transaction() as conn:
            conn.execute("UPDATE forward_jobs SET state = ?, attempts = ?, last_status = ?, "
                         "next_attempt_at = ?, updated_at = ? WHERE id = ?",
                         (state, attempts, status, time.time() + backoff(attempts, first, cap),
                          self._stamp(), job.id))
        return state

    def release(self, jobs: list[Job], reason: str) -> None:
        """The destination could not be reached: back to pending, no attempt counted."""
        with self.index.transaction() as conn:
            conn.executemany("UPDATE forward_jobs SET state = 'pending', last_status = ?, updated_at = ? "
                             "WHERE id = ? AND state = 'sending'",
                             [(reason[:200], self._stamp(), job.id) for job in jobs])

    # --- destination state ------------------------------------------------------------

    def destination(self, name: str) -> dict[str, Any]:
        conn = self.index.connection()
        row = conn.execute("SELECT * FROM destination_state WHERE name = ?", (name,)).fetchone()
        if row is None:  # the first time only: a write, so not on every poll
            conn.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (name,))
            row = conn.execute("SELECT * FROM destination_state WHERE name = ?", (name,)).fetchone()
        return dict(row)

    def set_destination(self, name: str, **values: Any) -> None:
        with self.index.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (name,))
            assignments = ", ".join(f"{key} = ?" for key in values)
            conn.execute(f"UPDATE destination_state SET {assignments} WHERE name = ?",
                         (*values.values(), name))

    def count_connect(self, name: str) -> None:
        """One more association opened: incremented in SQL, so parallel workers never lose one."""
        with self.index.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (name,))
            conn.execute("UPDATE destination_state SET connects = connects + 1 WHERE name = ?", (name,))

    # --- field-engineer commands --------------------------------------------------------

    def retry(self, job_ids: list[int] | None) -> int:
        """Failed jobs (all, or those given) go back to pending, with fresh attempts."""
        with self.index.transaction() as conn:
            if job_ids is None:
                cursor = conn.execute("UPDATE forward_jobs SET state = 'pending', attempts = 0, "
                                      "next_attempt_at = 0 WHERE state = 'failed'")
            else:
                cursor = conn.executemany("UPDATE forward_jobs SET state = 'pending', attempts = 0, "
                                          "next_attempt_at = 0 WHERE id = ? AND state != 'sending'",
                                          [(j,) for j in job_ids])
            return cursor.rowcount

    def drop(self, job_ids: list[int] | None) -> int:
        """Failed jobs (all, or those given, pending too) become 'dropped': kept, never sent again.

        A job on the wire right now is left alone (its outcome is about to be written), and a job
        already sent stays 'done'.
        """
        stamp = self._stamp()
        with self.index.transaction() as conn:
            if job_ids is None:
                cursor = conn.execute("UPDATE forward_jobs SET state = 'dropped', updated_at = ? "
                                      "WHERE state = 'failed'", (stamp,))
            else:
                cursor = conn.executemany("UPDATE forward_jobs SET state = 'dropped', updated_at = ? "
                                          "WHERE id = ? AND state IN ('pending', 'failed')",
                                          [(stamp, j) for j in job_ids])
            return cursor.rowcount

    def failures(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent failed jobs with why each failed, for `appliance status` and the page."""
        try:
            rows = self.index.connection().execute(
                "SELECT id, destination, sop_instance_uid, attempts, last_status, updated_at "
                "FROM forward_jobs WHERE state = 'failed' ORDER BY updated_at DESC, id DESC LIMIT ?",
                (limit,))
        except sqlite3.OperationalError:
            return []
        return [dict(row) for row in rows]

    def enqueue(self, sop_instance_uids: list[str], destination: str) -> int:
        stamp = self._stamp()
        with self.index.transaction() as conn:
            for uid in sop_instance_uids:
                conn.execute(
                    """INSERT INTO forward_jobs (sop_instance_uid, destination, created_at, updated_at)
                       VALUES (?, ?, ?, ?)
                       ON CONFLICT(sop_instance_uid, destination) DO UPDATE SET state = 'pending',
                         attempts = 0, next_attempt_at = 0, updated_at = excluded.updated_at
                       WHERE forward_jobs.state != 'sending'""",
                    (uid, destination, stamp, stamp),
                )
        return len(sop_instance_uids)

    def jobs(self, destination: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM forward_jobs"
        clauses, args = [], []
        if destination:
            clauses.append("destination = ?")
            args.append(destination)
        if state:
            clauses.append("state = ?")
            args.append(state)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return [dict(r) for r in self.index.connection().execute(sql + " ORDER BY id", args)]

    def counts(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        try:
            rows = self.index.connection().execute(
                "SELECT destination, state, COUNT(*) FROM forward_jobs GROUP BY destination, state")
        except sqlite3.OperationalError:
            return result
        for destination, state, count in rows:
            result.setdefault(destination, {})[state] = count
        return result
