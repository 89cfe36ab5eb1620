"""The index's tables, and the steps that bring an older index up to date.

`PRAGMA user_version` holds the version. A new index is made as the schema-5
tables (`SCHEMA_V5`) followed by every later step, so a new index and one
upgraded in the field are built by the same statements and cannot drift.
"""

from __future__ import annotations

DISK_TABLES = """
CREATE TABLE IF NOT EXISTS disks (
    uuid TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    role TEXT NOT NULL,
    pair INTEGER NOT NULL DEFAULT 0,
    adopted_at TEXT NOT NULL DEFAULT '',
    last_seen_at TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS disk_copies (
    sop_instance_uid TEXT NOT NULL,
    disk_uuid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    verified_at TEXT NOT NULL,
    PRIMARY KEY (sop_instance_uid, disk_uuid)
);
CREATE INDEX IF NOT EXISTS disk_copies_disk ON disk_copies(disk_uuid);
ALTER TABLE instances ADD COLUMN spool_purged_at TEXT NOT NULL DEFAULT ''
"""

FORWARD_TABLES = """
CREATE TABLE IF NOT EXISTS forward_jobs (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status TEXT NOT NULL DEFAULT '',
    next_attempt_at REAL NOT NULL DEFAULT 0,
    sent_count INTEGER NOT NULL DEFAULT 0,
    possible_duplicates INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL DEFAULT '',
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS forward_jobs_ready ON forward_jobs(destination, state, next_attempt_at);
CREATE TABLE IF NOT EXISTS destination_state (
    name TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    reachable INTEGER NOT NULL DEFAULT 1,
    failures INTEGER NOT NULL DEFAULT 0,
    next_try_at REAL NOT NULL DEFAULT 0,
    last_echo_at TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    connects INTEGER NOT NULL DEFAULT 0
)
"""

CONVERSION_TABLES = """
CREATE TABLE IF NOT EXISTS conversions (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    target_syntax TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS conversions_state ON conversions(state);
CREATE TABLE IF NOT EXISTS derivations (
    original_sop_instance_uid TEXT PRIMARY KEY,
    derived_sop_instance_uid TEXT NOT NULL,
    original_dataset_sha256 TEXT NOT NULL
)
"""

# A copy on an external disk is a fact about one file: this disk, this path, these
# bytes (sha256). A path holds one version at a time, so the key is (disk, path);
# a re-sent instance with new content needs copies of its own. Each disk keeps its
# health (the last write error, '' when the last write went well) and the
# appliance that adopted it; audit_events is the append-only audit trail.
DISK_TRUTH_TABLES = """
CREATE TABLE disk_files (
    disk_uuid TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    verified_at TEXT NOT NULL,
    PRIMARY KEY (disk_uuid, path)
);
INSERT OR REPLACE INTO disk_files (disk_uuid, path, sop_instance_uid, sha256, verified_at)
    SELECT disk_uuid, path, sop_instance_uid, sha256, verified_at FROM disk_copies;
DROP TABLE disk_copies;
ALTER TABLE disk_files RENAME TO disk_copies;
CREATE INDEX disk_copies_instance ON disk_copies(sop_instance_uid, sha256);
ALTER TABLE disks ADD COLUMN appliance_id TEXT NOT NULL DEFAULT '';
ALTER TABLE disks ADD COLUMN health TEXT NOT NULL DEFAULT '';
ALTER TABLE disks ADD COLUMN health_at TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT ''
)
"""

# Every name a Patient ID arrived with. The patients row keeps the newest name;
# this keeps the others, so an earlier name still finds the patient, and two
# names under one ID (a wrong-patient warning sign) can be shown. Each
# instance also keeps the name it arrived with.
PATIENT_NAME_TABLES = """
CREATE TABLE IF NOT EXISTS patient_names (
    patient_ref INTEGER NOT NULL REFERENCES patients(id),
    patient_name TEXT NOT NULL,
    arrivals INTEGER NOT NULL DEFAULT 0,
    first_received_at TEXT NOT NULL DEFAULT '',
    last_received_at TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (patient_ref, patient_name)
);
CREATE INDEX IF NOT EXISTS patient_names_name ON patient_names(patient_name)
"""

PATIENT_NAME_MIGRATION = PATIENT_NAME_TABLES + """;
ALTER TABLE instances ADD COLUMN patient_name TEXT NOT NULL DEFAULT '';
UPDATE instances SET patient_name = (
    SELECT p.patient_name FROM series se JOIN studies st ON st.id = se.study_ref
    JOIN patients p ON p.id = st.patient_ref WHERE se.id = instances.series_ref);
INSERT OR IGNORE INTO patient_names (patient_ref, patient_name, arrivals, first_received_at,
                                     last_received_at)
    SELECT st.patient_ref, i.patient_name, COUNT(*), MIN(i.received_at), MAX(i.received_at)
    FROM instances i JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref
    GROUP BY st.patient_ref, i.patient_name
"""

# Every conversion the check refused (the original kept): the count /metrics and
# `appliance status` show, and the reason, for a field engineer.
REFUSAL_TABLES = """
CREATE TABLE IF NOT EXISTS conversion_refusals (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    target_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    refused_at TEXT NOT NULL
)
"""

# Storage Commitment: each request a modality made (N-ACTION), kept until its
# N-EVENT-REPORT was answered with success, so a report the requester could not
# take (unreachable, restarted) is sent again with backoff, after a restart too.
# `requested` is a JSON list of [SOP Class UID, SOP Instance UID] pairs.
COMMITMENT_TABLES = """
CREATE TABLE IF NOT EXISTS commitment_transactions (
    transaction_uid TEXT PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    address TEXT NOT NULL,
    requested TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    received_at TEXT NOT NULL,
    delivered_at TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS commitment_pending ON commitment_transactions(state, next_attempt_at)
"""

# Steps from one schema version to the next, applied in order to an older index.
MIGRATIONS = {
    2: "ALTER TABLE instances ADD COLUMN dataset_sha256 TEXT NOT NULL DEFAULT ''",
    3: CONVERSION_TABLES,
    4: FORWARD_TABLES,
    5: DISK_TABLES,
    6: DISK_TRUTH_TABLES,
    7: PATIENT_NAME_MIGRATION,
    8: REFUSAL_TABLES,
    9: COMMITMENT_TABLES,
}

SCHEMA_VERSION = max(MIGRATIONS)

# The tables as they were at schema version 5; a new index runs this, then every
# later step, so new and upgraded indexes are made by the same statements.
SCHEMA_V5 = """
CREATE TABLE IF NOT EXISTS patients (
    id INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL UNIQUE,
    patient_name TEXT NOT NULL DEFAULT '',
    birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL UNIQUE,
    patient_ref INTEGER NOT NULL REFERENCES patients(id),
    accession_number TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    study_time TEXT NOT NULL DEFAULT '',
    study_description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    series_instance_uid TEXT NOT NULL UNIQUE,
    study_ref INTEGER NOT NULL REFERENCES studies(id),
    modality TEXT NOT NULL DEFAULT '',
    series_number TEXT NOT NULL DEFAULT '',
    station_name TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    series_ref INTEGER NOT NULL REFERENCES series(id),
    sop_class_uid TEXT NOT NULL,
    instance_number TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    dataset_sha256 TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    received_at TEXT NOT NULL,
    spool_purged_at TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS patients_name ON patients(patient_name);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_ref);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession_number);
CREATE INDEX IF NOT EXISTS series_study ON series(study_ref);
CREATE INDEX IF NOT EXISTS series_modality ON series(modality);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_ref);
CREATE INDEX IF NOT EXISTS instances_received ON instances(received_at);
""" + CONVERSION_TABLES + ";" + FORWARD_TABLES + ";" + DISK_TABLES.split("ALTER TABLE")[0]
