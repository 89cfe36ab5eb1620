"""Storage Commitment Push Model SCP (PS3.4 Annex J): "do you hold these instances safely?"

A modality sends N-ACTION (Action Type 1) naming a Transaction UID and the
instances it sent; it may delete its own copies of those we list as
committed. So an instance is committed only when it is durably here: indexed,
its file present and its bytes matching the recorded sha256 (read again now),
and not replaced by a lossy derivation unless the original is kept. With
[storage] commit_requires = "two-disks" its current version must also have
copies on two distinct healthy external disks verified within [disks]
verified_within_hours. Everything else is listed as failed: 0x0112 (no such
object instance), 0x0119 (class/instance conflict) or 0x0110 (processing
failure: present but not safe yet, ask again later).

The N-ACTION is answered at once; the transaction is written to the index
(commitment_transactions) before that answer, then the N-EVENT-REPORT goes
on the same association. A report not acknowledged with success there (the
requester released, or refused it) is sent by a worker thread on a new
association to the requester's [[peer]] address and port, with backoff,
after a restart too. On that association we are the requestor and propose
the Storage Commitment context with role selection SCU 0 / SCP 1 (PS3.4
J.3.3): we act as its SCP there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import dimse_messages, dimse_primitives

from appliance.archive.ingest import Archive, now_local
from appliance.dicom import command, peers, requests
from appliance.dicom.negotiation import UNCOMPRESSED
from appliance.peertext import printable

if TYPE_CHECKING:
    from appliance.dicom.association import Association
    from appliance.dicom.dimse import Command

log = logging.getLogger("appliance.dicom")

SOP_CLASS = "1.2.840.10008.1.20.1"
INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMIT = 1
ALL_COMMITTED, SOME_FAILED = 1, 2
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ARGUMENT = 0x0115
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION = 0x0123
N_EVENT_REPORT_RSP = 0x8100
MAX_BACKOFF = 3600.0


class Commitment:
    """The Storage Commitment SCP: N-ACTION handler, report sender and retry worker."""

    def __init__(self, archive: Archive, ae_title: str, known: tuple[peers.PeerSettings, ...],
                 commit_requires: str = "archive", verified_within_hours: float = 24.0,
                 retry_base: float = 30.0) -> None:
        self.archive = archive
        self.ae_title = ae_title
        self.known = known
        self.commit_requires = commit_requires
        self.verified_within_hours = verified_within_hours
        self.retry_base = retry_base
        # (association id, message ID) -> (transaction UID, association): reports awaiting their answer
        self.sent: dict[tuple[int, int], tuple[str, Association]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.worker: threading.Thread | None = None

    def register(self, services: requests.Services) -> None:
        services.register(requests.N_ACTION, SOP_CLASS, self.n_action)
        services.on_response(N_EVENT_REPORT_RSP, self.report_answered)

    # --- the N-ACTION -----------------------------------------------------------------

    def n_action(self, request: requests.Request) -> Iterator[tuple[int, Dataset | None]]:
        peer = request.association.peer
        if request.sop_instance != INSTANCE:
            yield NO_SUCH_OBJECT_INSTANCE, None  # only the well-known instance exists
            return
        if request.us(requests.ACTION_TYPE_ID) != REQUEST_COMMIT:
            yield NO_SUCH_ACTION, None
            return
        ds = request.dataset
        uid = str(getattr(ds, "TransactionUID", "") or "") if ds is not None else ""
        items = getattr(ds, "ReferencedSOPSequence", None) if ds is not None else None
        if not uid or not items:
            yield MISSING_ATTRIBUTE, None
            return
        try:
            pairs = [[str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID)] for item in items]
        except AttributeError:
            yield INVALID_ARGUMENT, None
            return
        with self.archive.index.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO commitment_transactions (transaction_uid, calling_ae, address, "
                "requested, state, next_attempt_at, received_at) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                (uid, peer.calling_ae, peer.address, json.dumps(pairs), time.time() + self.retry_base,
                 now_local().isoformat(timespec="seconds")))
        log.info("Storage Commitment request %s from %s for %d instance(s)", printable(uid), peer, len(pairs))
        request.after.append(lambda: self._report_here(request.association, uid, pairs))
        yield SUCCESS, None

    # --- what is committed ----------------------------------------------------------------

    def verdict(self, sop_class: str, sop_instance: str) -> int:
        """SUCCESS when this instance is safe to delete at the modality, else a Failure Reason."""
        index = self.archive.index
        row = index.instance(sop_instance)
        if row is None:
            return NO_SUCH_OBJECT_INSTANCE
        if row["sop_class_uid"] != sop_class:
            return CLASS_INSTANCE_CONFLICT
        derived = index.derivation(sop_instance)
        if derived is not None and derived["original_dataset_sha256"] != row["dataset_sha256"]:
            return PROCESSING_FAILURE  # the original was replaced by a lossy version: not what was sent
        if not _intact(self.archive.data_dir / row["path"], row["sha256"]):
            log.error("Storage Commitment: %s is indexed but its file is missing or altered; not committed",
                      printable(sop_instance))
            return PROCESSING_FAILURE
        if self.commit_requires == "two-disks":
            fresh = (now_local() - dt.timedelta(hours=self.verified_within_hours)).isoformat()
            if index.verified_copies(sop_instance, row["sha256"], fresh) < 2:
                return PROCESSING_FAILURE  # not yet on two disks: the modality asks again later
        return SUCCESS

    def report(self, uid: str, pairs: list[list[str]]) -> tuple[int, Dataset]:
        """(event type, Event Information) for one transaction, evaluated now."""
        committed, failed = Sequence(), Sequence()
        for sop_class, sop_instance in pairs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            reason = self.verdict(sop_class, sop_instance)
            if reason == SUCCESS:
                committed.append(item)
            else:
                item.FailureReason = reason
                failed.append(item)
        info = Dataset()
        info.TransactionUID = uid
        if committed:
            info.ReferencedSOPSequence = committed
        if failed:
            info.FailedSOPSequence = failed
        log.info("Storage Commitment %s: %d committed, %d failed", printable(uid), len(committed),
                 len(failed))
        return (SOME_FAILED if failed else ALL_COMMITTED), info

    # --- the report on the same association -------------------------------------------

    def _report_here(self, association: Association, uid: str, pairs: list[list[str]]) -> None:
        event, info = self.report(uid, pairs)
        context_id = next((cid for cid, (abstract, _) in association.contexts.items()
                           if abstract == SOP_CLASS), None)
        if context_id is None or association.closed.is_set():
            self._failed(uid, "association closed before the report", soon=True)
            return
        primitive = dimse_primitives.N_EVENT_REPORT()
        primitive.MessageID = next(association.message_ids)
        primitive.AffectedSOPClassUID = SOP_CLASS
        primitive.AffectedSOPInstanceUID = INSTANCE
        primitive.EventTypeID = event
        primitive.EventInformation = association.encode(info, context_id)
        message = dimse_messages.N_EVENT_REPORT_RQ()
        message.primitive_to_message(primitive)
        with self.lock:
            self.sent[(id(association), primitive.MessageID)] = (uid, association)
        if not association.send_message(message, context_id):
            self._failed(uid, "cannot send the report on the same association", soon=True)

    def report_answered(self, association: Association, cmd: Command) -> None:
        """An N-EVENT-REPORT-RSP: success ends the transaction, anything else leaves it to the worker."""
        responded = command.us(cmd.fields, command.MESSAGE_ID_RESPONDED, 0)
        with self.lock:
            uid, _ = self.sent.pop((id(association), responded), (None, None))
        if uid is None:
            log.info("N-EVENT-REPORT-RSP from %s for no report of ours; ignored", association.peer)
            return
        status = command.us(cmd.fields, command.STATUS, 0xFFFF)
        if status == SUCCESS:
            self._delivered(uid)
        else:
            log.warning("Storage Commitment report %s refused by %s (%#06x); retried on a new association",
                        printable(uid), association.peer, status)
            self._failed(uid, f"refused with status {status:#06x}", soon=True)

    # --- durable state --------------------------------------------------------------------

    def _delivered(self, uid: str) -> None:
        with self.archive.index.transaction() as conn:
            conn.execute("UPDATE commitment_transactions SET state = 'delivered', delivered_at = ?, "
                         "last_error = '' WHERE transaction_uid = ?",
                         (now_local().isoformat(timespec="seconds"), uid))
        log.info("Storage Commitment report %s delivered", printable(uid))

    def _failed(self, uid: str, why: str, soon: bool = False) -> None:
        with self.archive.index.transaction() as conn:
            row = conn.execute("SELECT attempts FROM commitment_transactions WHERE transaction_uid = ?",
                               (uid,)).fetchone()
            attempts = (row[0] if row else 0) + (0 if soon else 1)
            delay = 0.0 if soon else min(MAX_BACKOFF, self.retry_base * 2 ** max(0, attempts - 1))
            conn.execute("UPDATE commitment_transactions SET attempts = ?, next_attempt_at = ?, "
                         "last_error = ? WHERE transaction_uid = ?",
                         (attempts, time.time() + delay, why, uid))

    # --- the worker: reports on a new association -------------------------------------

    def start(self) -> None:
        self.worker = threading.Thread(target=self._work, name="commitment-reports", daemon=True)
        self.worker.start()
        self.ready.wait(30)  # its index connection open before the service says it is ready

    def stop(self) -> None:
        self.stopping.set()
        if self.worker is not None:
            self.worker.join(timeout=30)

    def _work(self) -> None:
        try:
            with self.archive.index.transaction() as conn:  # after a restart, pending reports go at once
                conn.execute("UPDATE commitment_transactions SET next_attempt_at = 0 WHERE state = 'pending'")
        except Exception:
            log.exception("Storage Commitment: cannot read pending reports; trying again later")
        finally:
            self.ready.set()
        try:
            while not self.stopping.wait(min(self.retry_base, 5.0) / 5):
                try:
                    self.send_due()
                except Exception:  # a bug costs a round, never the worker
                    log.exception("Storage Commitment worker failed; trying again later")
        finally:
            self.archive.index.close()

    def send_due(self) -> None:
        with self.lock:
            gone = [key for key, (_, association) in self.sent.items() if association.closed.is_set()]
            orphans = [self.sent.pop(key)[0] for key in gone]
        for uid in orphans:  # the association ended before the requester answered the report
            self._failed(uid, "association closed before the report was answered", soon=True)
        rows = self.archive.index.connection().execute(
            "SELECT transaction_uid, calling_ae, address, requested FROM commitment_transactions "
            "WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT 20",
            (time.time(),)).fetchall()
        for uid, calling_ae, address, requested in rows:
            if self.stopping.is_set():
                return
            self._send_new(uid, calling_ae, address, json.loads(requested))

    def _send_new(self, uid: str, calling_ae: str, address: str, pairs: list[list[str]]) -> None:
        from pynetdicom import AE, build_role

        target = self.destination(calling_ae, address)
        if target is None:
            self._failed(uid, f"no [[peer]] entry with a port for {calling_ae}")
            log.warning("Storage Commitment report %s for %s cannot be sent: its [[peer]] entry has no "
                        "port", printable(uid), printable(calling_ae))
            return
        event, info = self.report(uid, pairs)
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(SOP_CLASS, UNCOMPRESSED)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        role = build_role(SOP_CLASS, scu_role=False, scp_role=True)
        assoc = ae.associate(target[0], target[1], ae_title=calling_ae, ext_neg=[role])
        if not assoc.is_established:
            self._failed(uid, f"cannot associate with {calling_ae} at {target[0]}:{target[1]}")
            log.warning("Storage Commitment report %s: cannot associate with %s at %s:%d; retried later",
                        printable(uid), printable(calling_ae), target[0], target[1])
            return
        try:
            status, _ = assoc.send_n_event_report(info, event, SOP_CLASS, INSTANCE)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code == SUCCESS:
            self._delivered(uid)
        else:
            self._failed(uid, f"N-EVENT-REPORT answered {code}")

    def destination(self, calling_ae: str, address: str) -> tuple[str, int] | None:
        """(address, port) of the requester: its [[peer]] entry's port, its address if one IP."""
        for entry in self.known:
            if entry.ae_title != calling_ae or not entry.port:
                continue
            if entry.address:
                network = ipaddress.ip_network(entry.address, strict=False)
                if network.num_addresses == 1:
                    return str(network.network_address), entry.port
            return address, entry.port
        return None


def _intact(path: Path, sha256: str) -> bool:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    except OSError:
        return False
    return digest.hexdigest() == sha256
