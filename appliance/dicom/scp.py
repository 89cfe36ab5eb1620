"""The DICOM service: Verification and Storage SCP in front of the archive.

Like pynetdicom's own examples, the network side is a few small handlers
bound to events; it knows nothing of files or SQLite. A C-STORE hands the
received temp file to `Archive.ingest_file()` and answers with what the
archive says:

    stored / duplicate / replaced  -> 0x0000 Success (only after fsync + index commit)
    OutOfSpace                     -> 0xA700 Refused: out of resources (sender retries)
    Rejected                       -> 0xC000 Cannot understand (bytes in quarantine)
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from appliance.archive.ingest import Archive, OutOfSpace, Rejected
from appliance.config import NodeSettings
from appliance.dicom import negotiation, spool

log = logging.getLogger("appliance.dicom")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def set_nodelay(event: evt.Event) -> None:
    """Turn Nagle off: without it every C-STORE response waits ~40 ms (NOTES.md)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    # Error Comment is LO: 64 characters at most.
    status.ErrorComment = comment.encode("ascii", "replace").decode("ascii")[:64]
    return status


def _peer(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}:{requestor.port}"


@dataclass
class Counters:
    """What the status page and `appliance status` show about this service."""

    stored: int = 0
    duplicates: int = 0
    replaced: int = 0
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

    def __init__(self, node: NodeSettings, archive: Archive) -> None:
        self.node = node
        self.archive = archive
        self.counters = Counters()
        self.server: ThreadedAssociationServer | None = None
        spool.install(archive.new_temp_path)
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.maximum_pdu_size = node.max_pdu
        if node.allowed_callers:
            ae.require_calling_aet = list(node.allowed_callers)
        # The real list is built per association in _on_requested; pynetdicom
        # only needs one context to agree to start the server.
        ae.add_supported_context(negotiation.VERIFICATION, negotiation.UNCOMPRESSED)
        self.ae = ae

    # --- event handlers --------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        requested = event.assoc.requestor.primitive.presentation_context_definition_list
        event.assoc.acceptor.supported_contexts = negotiation.contexts_for(requested)

    def _on_rejected(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.ae_title
        if self.node.allowed_callers and calling not in self.node.allowed_callers:
            reason = (
                f"calling AE title {calling!r} is not in [node] allowed_callers "
                f"({', '.join(self.node.allowed_callers)}); add it there to let it in"
            )
        else:
            reason = (
                f"{self.node.max_associations} associations are already open ([node] "
                "max_associations); the sender should retry later"
            )
        log.warning("rejected association from %s: %s", _peer(event), reason)
        self.counters.bump("associations_rejected", reason)

    def _on_established(self, event: evt.Event) -> None:
        contexts = event.assoc.accepted_contexts
        called = event.assoc.requestor.primitive.called_ae_title
        if called != self.node.ae_title:
            log.info("association from %s calls us %r, not %r (accepted anyway)", _peer(event),
                     called, self.node.ae_title)
        if not contexts:
            proposed = {str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts}
            log.warning("association from %s: none of its presentation contexts can be served "
                        "(proposed %s)", _peer(event), ", ".join(sorted(proposed)) or "none")
            return
        log.info("association from %s accepted (%d presentation contexts)", _peer(event), len(contexts))

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s", _peer(event))
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        path = event.dataset_path
        received = spool.claim(path)
        peer = _peer(event)
        calling_ae = event.assoc.requestor.ae_title
        if received is not None and received.error is not None:
            reason = f"cannot write received data to {self.archive.temp_dir}: {received.error.strerror}"
            log.error("C-STORE from %s refused (0xA700): %s", peer, reason)
            self.counters.bump("refused_out_of_space", reason)
            return _status(OUT_OF_RESOURCES, "Gateway disk full or unwritable; retry later")
        try:
            stored = self.archive.ingest_file(path, calling_ae=calling_ae, source=f"C-STORE from {peer}")
        except OutOfSpace as exc:
            log.error("C-STORE from %s refused (0xA700): %s", peer, exc)
            self.counters.bump("refused_out_of_space", str(exc))
            return _status(OUT_OF_RESOURCES, "Gateway disk full or unwritable; retry later")
        except Rejected as exc:
            self.counters.bump("rejected", exc.reason)
            return _status(CANNOT_UNDERSTAND, f"Unreadable dataset: {exc.reason[-44:]}")
        except Exception as exc:  # a bug must cost a retry, never the service
            log.exception("C-STORE from %s failed unexpectedly; answered 0xA700 so it is retried", peer)
            self.counters.bump("refused_out_of_space", f"internal error: {exc}")
            return _status(OUT_OF_RESOURCES, "Gateway internal error; retry later")
        self.counters.bump(stored.outcome if stored.outcome != "duplicate" else "duplicates")
        with self.counters.lock:
            self.counters.last_store_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.debug("C-STORE %s from %s: %s %s", stored.record.sop_instance_uid, peer, stored.outcome,
                  stored.path)
        return SUCCESS

    # --- life cycle ------------------------------------------------------------

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            self.server = self.ae.start_server(
                (self.node.bind_address, self.node.dicom_port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on {self.node.bind_address}:{self.node.dicom_port}: {exc.strerror}; "
                "is another DICOM service using the port? change [node] dicom_port",
            ) from None
        log.info("DICOM service %s listening on %s:%d", self.node.ae_title, self.node.bind_address,
                 self.node.dicom_port)

    def active_associations(self) -> int:
        return len(self.server.active_associations) if self.server else 0

    def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let running associations finish, then abort the rest."""
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()
        running = server.active_associations
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline:
            running = [a for a in running if a.is_alive()]
            time.sleep(0.05)
        for assoc in running:
            log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        log.info("DICOM service stopped")

    def state(self) -> dict[str, object]:
        return {
            "ae_title": self.node.ae_title,
            "port": self.node.dicom_port,
            "associations": self.active_associations(),
            **self.counters.snapshot(),
        }
