"""The DICOM service: Verification, Storage and Storage Commitment SCP in front of the archive.

As in pynetdicom's examples, the network side (acceptor.py) calls a few small
handlers and knows nothing of files or SQLite. A C-STORE hands the received
spool file to `Archive.ingest_file()` and answers with what the archive says:

    stored / duplicate / replaced  -> 0x0000 Success (only after fsync + index commit)
    OutOfSpace                     -> 0xA700 Refused: out of resources (sender retries)
    kept-first ([storage] on_conflict) -> 0x0000 Success (the first version stays; new bytes in quarantine)
    Conflict ([storage] on_conflict = "reject")
                                   -> 0x0111 Duplicate SOP Instance (bytes in quarantine)
    Rejected                       -> 0xC000 Cannot understand (bytes in quarantine)
    command and dataset disagree   -> 0xA900 (SOP Class UID) or 0xC000 (SOP Instance UID),
                                      bytes in quarantine

Peer text (AE titles, UIDs) reaches the log only through peertext.printable().
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.archive.ingest import Archive, Conflict, OutOfSpace, Rejected
from appliance.archive.record import InstanceRecord
from appliance.config import NodeSettings
from appliance.dicom.acceptor import Acceptor
from appliance.dicom.commitment import Commitment
from appliance.dicom.dimse import Peer, StoreRequest
from appliance.dicom.peers import PeerSettings
from appliance.dicom.requests import Services
from appliance.peertext import printable

log = logging.getLogger("appliance.dicom")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_MISMATCH = 0xA900  # PS3.4 B.2.3: "Data Set does not match SOP Class"
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.5: the UID is already another object's (on_conflict = reject)


def disagreement(request: StoreRequest, record: InstanceRecord) -> tuple[int, str] | None:
    """(status, reason) when the C-STORE command names another object than its dataset holds.

    The command's Affected SOP Class UID against the dataset's SOP Class UID
    gives 0xA900, the status PS3.4 defines for it. For the SOP Instance UID
    PS3.4 has no status of its own: 0xC000 "cannot understand" (an error, not
    a refusal: sending the same bytes again cannot succeed).
    """
    if request.sop_class_uid and record.sop_class_uid and request.sop_class_uid != record.sop_class_uid:
        return SOP_CLASS_MISMATCH, ("the command's Affected SOP Class UID "
                                    f"{printable(request.sop_class_uid)} "
                                    f"differs from the dataset's {printable(record.sop_class_uid)}")
    if request.sop_instance_uid != record.sop_instance_uid:
        return CANNOT_UNDERSTAND, (f"the command's Affected SOP Instance UID "
                                   f"{printable(request.sop_instance_uid)} differs from the dataset's "
                                   f"{printable(record.sop_instance_uid)}")
    return None


@dataclass
class Counters:
    """What the status page and `appliance status` show about this service."""

    stored: int = 0
    duplicates: int = 0
    replaced: int = 0
    conflicts: int = 0
    rejected: int = 0
    refused_out_of_space: int = 0
    associations_rejected: int = 0
    last_store_at: str = ""
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str, error: str = "") -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)
            if error:
                self.last_error = error

    def snapshot(self) -> dict[str, int | str]:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class DicomService:
    """Verification + Storage SCP bound to an archive."""

    def __init__(self, node: NodeSettings, archive: Archive, known: tuple[PeerSettings, ...] = (),
                 commitment: Commitment | None = None) -> None:
        self.node = node
        self.archive = archive
        self.counters = Counters()
        self.commitment = commitment
        services = Services()
        if commitment is not None:
            commitment.register(services)
        self.acceptor = Acceptor(node, self, known=known, services=services)
        self.index_problem = ""  # set while the index cannot be written: stores get 0xA700

    # --- handlers the acceptor calls --------------------------------------------

    def new_spool_path(self) -> Path:
        return self.archive.new_temp_path()

    def closed(self, peer: Peer) -> None:
        """An association thread ends: close its index connection (one per thread)."""
        self.archive.index.close()

    def rejected(self, peer: Peer, reason: str) -> None:
        log.warning("rejected association from %s: %s", peer, reason)
        self.counters.bump("associations_rejected", reason)

    def echo(self, peer: Peer) -> int:
        log.info("C-ECHO from %s", peer)
        return SUCCESS

    def store(self, request: StoreRequest) -> tuple[int, str]:
        peer = request.peer
        if request.write_error is not None:
            request.path.unlink(missing_ok=True)
            reason = f"cannot write received data to {self.archive.temp_dir}: {request.write_error.strerror}"
            log.error("C-STORE from %s refused (0xA700): %s", peer, reason)
            self.counters.bump("refused_out_of_space", reason)
            return OUT_OF_RESOURCES, "Gateway disk full or unwritable; retry later"
        mismatch: list[tuple[int, str]] = []

        def agree(record: InstanceRecord) -> str | None:
            found = disagreement(request, record)
            if found is None:
                return None
            mismatch.append(found)
            return found[1]

        try:
            stored = self.archive.ingest_file(request.path, calling_ae=peer.calling_ae,
                                              source=f"C-STORE from {peer}", expect=agree)
        except OutOfSpace as exc:
            log.error("C-STORE from %s refused (0xA700): %s", peer, exc)
            self.counters.bump("refused_out_of_space", str(exc))
            return OUT_OF_RESOURCES, "Gateway disk full or unwritable; retry later"
        except Conflict as exc:
            self.counters.bump("conflicts", exc.reason)
            log.warning("C-STORE from %s refused (0x0111): %s", peer, exc.reason)
            return DUPLICATE_SOP_INSTANCE, "Instance already stored from another sender"
        except Rejected as exc:
            self.counters.bump("rejected", exc.reason)
            if mismatch:
                status, reason = mismatch[0]
                log.warning("C-STORE from %s refused (%#06x): %s", peer, status, reason)
                comment = "SOP Class UID" if status == SOP_CLASS_MISMATCH else "SOP Instance UID"
                return status, f"{comment} of command and dataset differ"
            return CANNOT_UNDERSTAND, f"Unreadable dataset: {exc.reason[-44:]}"
        except sqlite3.Error as exc:  # the index is unusable: refused, retried by the sender
            self.index_problem = f"the index {self.archive.index.path} cannot be written: {exc}"
            log.error("C-STORE from %s refused (0xA700): %s", peer, self.index_problem)
            self.counters.bump("refused_out_of_space", self.index_problem)
            return OUT_OF_RESOURCES, "Gateway index unusable; retry later"
        except Exception as exc:  # a bug must cost a retry, never the service
            log.exception("C-STORE from %s failed unexpectedly; answered 0xA700 so it is retried", peer)
            self.counters.bump("refused_out_of_space", f"internal error: {exc}")
            return OUT_OF_RESOURCES, "Gateway internal error; retry later"
        self.index_problem = ""
        counter = {"duplicate": "duplicates", "kept-first": "conflicts"}.get(stored.outcome, stored.outcome)
        self.counters.bump(counter)
        with self.counters.lock:
            self.counters.last_store_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.debug("C-STORE %s from %s: %s %s", stored.record.sop_instance_uid, peer, stored.outcome,
                  stored.path)
        return SUCCESS, ""

    # --- life cycle ------------------------------------------------------------

    def start(self) -> None:
        if self.commitment is not None:
            self.commitment.start()
        try:
            self.acceptor.start()
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on {self.node.bind_address}:{self.node.dicom_port}: {exc.strerror}; "
                "is another DICOM service using the port? change [node] dicom_port",
            ) from None
        log.info("DICOM service %s listening on %s:%d", self.node.ae_title, self.node.bind_address,
                 self.node.dicom_port)

    @property
    def listening(self) -> bool:
        return self.acceptor.listening

    def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let running associations finish, then abort the rest."""
        self.acceptor.stop(grace)
        if self.commitment is not None:
            self.commitment.stop()
        log.info("DICOM service stopped")

    def state(self) -> dict[str, object]:
        return {
            "ae_title": self.node.ae_title,
            "port": self.node.dicom_port,
            "associations": self.acceptor.active(),
            **self.counters.snapshot(),
        }
