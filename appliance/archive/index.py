"""The SQLite index: patient, study, series and instance rows.

SQLite in WAL mode with synchronous=FULL: every commit is on disk before the
sender hears success, readers (status page, `appliance find`) never block the
receiver, and several services can share the file. Each thread gets its own
connection; transactions are short.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.archive.record import InstanceRecord
from appliance.archive.schema import MIGRATIONS, SCHEMA_V5, SCHEMA_VERSION

INSTANCE_VIEW = """
SELECT i.sop_instance_uid, i.sop_class_uid, i.instance_number, i.transfer_syntax_uid,
       i.path, i.size, i.sha256, i.dataset_sha256, i.calling_ae, i.source, i.received_at,
       i.patient_name AS arrived_patient_name, i.spool_purged_at,
       se.series_instance_uid, se.modality, se.series_number, se.station_name,
       st.study_instance_uid, st.accession_number, st.study_date, st.study_time,
       st.study_description,
       p.patient_id, p.patient_name, p.birth_date, p.sex
FROM instances i
JOIN series se ON se.id = i.series_ref
JOIN studies st ON st.id = se.study_ref
JOIN patients p ON p.id = st.patient_ref
"""


class SchemaMismatch(Exception):
    """The index was made by another version of the software; the message says what to do."""


class Index:
    """The archive's SQLite index; safe to share between threads."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """Open the index; `create` makes or upgrades the schema (services do, readers don't)."""
        self.path = path
        self._local = threading.local()
        conn = self.connection()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaMismatch(
                f"index {path} has schema version {version}, newer than this software "
                f"({SCHEMA_VERSION}); update the appliance software"
            )
        if create and version < SCHEMA_VERSION:
            # A new index: the schema-5 tables, then the same steps an old one takes.
            base, version = ([SCHEMA_V5], 5) if version == 0 else ([], version)
            steps = "; ".join(base + [MIGRATIONS[v] for v in range(version + 1, SCHEMA_VERSION + 1)])
            conn.executescript(
                f"BEGIN IMMEDIATE; {steps}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        elif version < SCHEMA_VERSION:
            raise SchemaMismatch(
                f"index {path} has schema version {version}, older than this software "
                f"({SCHEMA_VERSION}); start the dicom service once to upgrade it"
            )

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # --- writing ---------------------------------------------------------------

    @staticmethod
    def upsert_instance(
        conn: sqlite3.Connection,
        record: InstanceRecord,
        *,
        path: str,
        size: int,
        sha256: str,
        dataset_sha256: str,
        calling_ae: str,
        source: str,
        received_at: str,
    ) -> int:
        """Insert or update the four rows of one instance; return the instance row id.

        Newer data wins at every level: a corrected patient name or a study
        moved to another patient follows the last object received. The name
        the instance arrived with is kept on the instance and in
        `patient_names`, so earlier names are not lost.
        """
        patient = conn.execute(
            """INSERT INTO patients (patient_id, patient_name, birth_date, sex)
               VALUES (?, ?, ?, ?)
               ON CONFLICT(patient_id) DO UPDATE SET
                 patient_name = excluded.patient_name,
                 birth_date = excluded.birth_date, sex = excluded.sex
               RETURNING id""",
            (record.patient_id, record.patient_name, record.birth_date, record.sex),
        ).fetchone()[0]
        conn.execute(
            """INSERT INTO patient_names (patient_ref, patient_name, arrivals, first_received_at,
                                          last_received_at)
               VALUES (?, ?, 1, ?, ?)
               ON CONFLICT(patient_ref, patient_name) DO UPDATE SET
                 arrivals = arrivals + 1,
                 last_received_at = MAX(last_received_at, excluded.last_received_at)""",
            (patient, record.patient_name, received_at, received_at),
        )
        study = conn.execute(
            """INSERT INTO studies (study_instance_uid, patient_ref, accession_number,
                                    study_date, study_time, study_description)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT(study_instance_uid) DO UPDATE SET
                 patient_ref = excluded.patient_ref,
                 accession_number = excluded.accession_number,
                 study_date = excluded.study_date, study_time = excluded.study_time,
                 study_description = excluded.study_description
               RETURNING id""",
            (record.study_instance_uid, patient, record.accession_number, record.study_date,
             record.study_time, record.study_description),
        ).fetchone()[0]
        series = conn.execute(
            """INSERT INTO series (series_instance_uid, study_ref, modality, series_number,
                                   station_name)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(series_instance_uid) DO UPDATE SET
                 study_ref = excluded.study_ref, modality = excluded.modality,
                 series_number = excluded.series_number, station_name = excluded.station_name
               RETURNING id""",
            (record.series_instance_uid, study, record.modality, record.series_number,
             record.station_name),
        ).fetchone()[0]
        return conn.execute(
            """INSERT INTO instances (sop_instance_uid, series_ref, sop_class_uid,
                 instance_number, transfer_syntax_uid, path, size, sha256, dataset_sha256,
                 calling_ae, source, received_at, patient_name)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(sop_instance_uid) DO UPDATE SET
                 series_ref = excluded.series_ref, sop_class_uid = excluded.sop_class_uid,
                 instance_number = excluded.instance_number,
                 transfer_syntax_uid = excluded.transfer_syntax_uid, path = excluded.path,
                 size = excluded.size, sha256 = excluded.sha256,
                 dataset_sha256 = excluded.dataset_sha256, calling_ae = excluded.calling_ae,
                 source = excluded.source,
                 received_at = excluded.received_at, patient_name = excluded.patient_name
               RETURNING id""",
            (record.sop_instance_uid, series, record.sop_class_uid, record.instance_number,
             record.transfer_syntax_uid, path, size, sha256, dataset_sha256, calling_ae, source,
             received_at, record.patient_name),
        ).fetchone()[0]

    # --- reading ---------------------------------------------------------------

    def stored_file(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """path, sha256 and dataset_sha256 of an instance: the check every ingest makes."""
        row = self.connection().execute(
            "SELECT path, sha256, dataset_sha256 FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        ).fetchone()
        return dict(row) if row else None

    def disk_copies(self, sop_instance_uid: str, sha256: str) -> list[dict[str, Any]]:
        """The external copies recorded for this version of an instance (its sha256)."""
        rows = self.connection().execute(
            """SELECT d.label, d.role, d.pair, c.path, c.verified_at FROM disk_copies c
               JOIN disks d ON d.uuid = c.disk_uuid
               WHERE c.sop_instance_uid = ? AND c.sha256 = ?
               ORDER BY d.pair, d.role != 'primary', d.label""",
            (sop_instance_uid, sha256),
        ).fetchall()
        return [dict(row) for row in rows]

    def verified_copies(self, sop_instance_uid: str, sha256: str, fresh_after: str) -> int:
        """How many distinct healthy disks hold this version, verified at or after `fresh_after`.

        Storage Commitment with commit_requires = "two-disks" needs two: a copy
        counts only when its bytes (sha256) are the current version's, the disk's
        last write went well and the copy was re-read recently.
        """
        row = self.connection().execute(
            """SELECT COUNT(DISTINCT c.disk_uuid) FROM disk_copies c JOIN disks d ON d.uuid = c.disk_uuid
               WHERE c.sop_instance_uid = ? AND c.sha256 = ? AND c.verified_at >= ? AND d.health = ''""",
            (sop_instance_uid, sha256, fresh_after),
        ).fetchone()
        return int(row[0])

    def derivation(self, original_sop_instance_uid: str) -> dict[str, Any] | None:
        """The lossy-compressed instance the archive keeps in place of an original."""
        row = self.connection().execute(
            "SELECT * FROM derivations WHERE original_sop_instance_uid = ?", (original_sop_instance_uid,)
        ).fetchone()
        return dict(row) if row else None

    def instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        row = self.connection().execute(
            INSTANCE_VIEW + " WHERE i.sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return dict(row) if row else None

    def find(
        self,
        *,
        patient_id: str | None = None,
        patient_name: str | None = None,
        study_date: str | None = None,
        modality: str | None = None,
        accession_number: str | None = None,
        study_instance_uid: str | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Instances matching every given criterion, oldest study first.

        `study_date` takes YYYYMMDD or a range YYYYMMDD-YYYYMMDD; `patient_name`
        matches a substring of any name group (alphabetic, kanji, kana) of any
        name the patient's images arrived with, not only the newest one.
        """
        clauses: list[str] = []
        args: list[Any] = []
        if patient_id is not None:
            clauses.append("p.patient_id = ?")
            args.append(patient_id)
        if patient_name is not None:
            clauses.append("p.id IN (SELECT patient_ref FROM patient_names "
                           "WHERE patient_name LIKE ? ESCAPE '\\')")
            escaped = patient_name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
        if study_date is not None:
            low, dash, high = study_date.partition("-")
            clauses.append("st.study_date BETWEEN ? AND ?")
            args.extend([low or "00000000", high or "99999999"] if dash else [low, low])
        if modality is not None:
            clauses.append("se.modality = ?")
            args.append(modality)
        if accession_number is not None:
            clauses.append("st.accession_number = ?")
            args.append(accession_number)
        if study_instance_uid is not None:
            clauses.append("st.study_instance_uid = ?")
            args.append(study_instance_uid)
        sql = INSTANCE_VIEW
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY st.study_date, st.study_time, se.series_number + 0, i.instance_number + 0"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.connection().execute(sql, args):
            yield dict(row)

    def counts(self, received_prefix: str) -> dict[str, int]:
        """Instance and byte counts, in all and received on a day (YYYY-MM-DD prefix)."""
        conn = self.connection()
        total, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances").fetchone()
        today, today_size = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances WHERE received_at >= ? "
            "AND received_at < ?",
            (received_prefix, received_prefix + "\uffff"),
        ).fetchone()
        return {"instances": total, "bytes": size, "instances_today": today, "bytes_today": today_size}

    def patients_with_several_names(self, limit: int = 20) -> tuple[int, list[dict[str, Any]]]:
        """Patient IDs whose images arrived under more than one non-empty name, newest first.

        Returns how many such IDs there are and the first `limit` of them, each
        with its names (oldest first) and how many objects arrived under each.
        """
        conn = self.connection()
        several = """SELECT patient_ref FROM patient_names WHERE patient_name != ''
                     GROUP BY patient_ref HAVING COUNT(*) > 1"""
        total = conn.execute(f"SELECT COUNT(*) FROM ({several})").fetchone()[0]
        found = []
        for (ref,) in conn.execute(
            f"""SELECT n.patient_ref FROM patient_names n WHERE n.patient_ref IN ({several})
                GROUP BY n.patient_ref ORDER BY MAX(n.last_received_at) DESC LIMIT ?""",
            (int(limit),),
        ).fetchall():
            names = conn.execute(
                """SELECT patient_name, arrivals, first_received_at, last_received_at FROM patient_names
                   WHERE patient_ref = ? AND patient_name != '' ORDER BY first_received_at""",
                (ref,),
            ).fetchall()
            patient_id = conn.execute("SELECT patient_id FROM patients WHERE id = ?", (ref,)).fetchone()[0]
            found.append({"patient_id": patient_id, "names": [dict(n) for n in names]})
        return total, found

    def integrity_check(self) -> str:
        return self.connection().execute("PRAGMA integrity_check").fetchone()[0]
