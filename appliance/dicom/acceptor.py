"""The DICOM port: a selector for connections not yet associated, a thread per association.

A connection costs no thread until its A-ASSOCIATE-RQ is complete and
accepted. Until then it lives in one selector loop (the listener thread)
with a small buffer that grows only with the bytes actually received, up to
pdu.MAX_ASSOCIATE_RQ; at most `max_pending` such connections exist, at most
`max_pending_per_address` from one address, and each has `acse_timeout`
(the set-up ARTIM timer of PS3.8) to send its request: past that it is
closed. A new connection over a cap takes the place of the one (from the
same address, or overall) that has waited longest.

A complete request is parsed (associate.py); a malformed one gets A-ABORT, a
refused one A-ASSOCIATE-RJ, and both are then drained until the peer closes
or `artim_timeout` passes (Sta13). An accepted one gets a slot among
`max_associations` and a thread that sends the A-ASSOCIATE-AC and runs the
established phase (association.py), whose DIMSE messages go to the dispatch
table (dimse.py).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.config import NodeSettings
from appliance.dicom import associate, dimse, negotiation, pdu, peers, requests
from appliance.dicom.association import Association
from appliance.dicom.dimse import Handlers, Peer
from appliance.dicom.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from appliance.peertext import printable

log = logging.getLogger("appliance.dicom")

READ_STEP = 1 << 16  # the most one recv() of the pending stage asks for
REFUSAL_LOG_EVERY = 10.0  # seconds between two warnings about refused connections from one address


@dataclass
class _Pending:
    """A connection in the pending stage: waiting for its A-ASSOCIATE-RQ, or being drained."""

    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    draining: bool = False


class Acceptor:
    """Listens on the DICOM port and runs one Association per accepted association."""

    def __init__(self, node: NodeSettings, handlers: Handlers,
                 dispatch: dict[int, dimse.Handler] | None = None,
                 known: tuple[peers.PeerSettings, ...] = (),
                 services: requests.Services | None = None) -> None:
        self.node = node
        self.known = known  # [[peer]]: empty = no per-peer control
        self.handlers = handlers
        self.dispatch = dict(dispatch or dimse.DEFAULT_DISPATCH)
        self.services = services or requests.Services()
        self.dispatch.update(self.services.dispatch_table())
        self.served = self.services.abstract_syntaxes()  # non-storage SOP classes a service registered
        self._active: set[Association] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._pending: dict[int, _Pending] = {}
        self._refusals: dict[str, tuple[float, int]] = {}

    # --- slots --------------------------------------------------------------------------

    def active(self) -> int:
        with self._lock:
            return len(self._active)

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.create_server((self.node.bind_address, self.node.dicom_port), reuse_port=False,
                                        backlog=64)
        listener.setblocking(False)
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="dicom-listener", daemon=True)
        self._thread.start()

    @property
    def listening(self) -> bool:
        """True while the listener thread runs (the service's health check)."""
        return self._listener is not None and self._thread is not None and self._thread.is_alive()

    def stop(self, grace: float, on_abort: Callable[[Association], None] | None = None) -> None:
        """Stop listening, let running associations finish, then abort the rest."""
        if self._listener is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._listener = None
        deadline = time.monotonic() + grace
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            leftovers = list(self._active)
        for association in leftovers:
            log.warning("aborting association from %s at shutdown", association.peer)
            association.abort()

    # --- the pending stage (listener thread) ----------------------------------------------

    def _loop(self) -> None:
        listener = self._listener
        assert listener is not None
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, None)
        try:
            while not self._stopping.is_set():
                for key, _events in selector.select(timeout=self._next_wait()):
                    try:
                        if key.data is None:
                            self._accept(listener, selector)
                        else:
                            self._readable(key.data, selector)
                    except Exception:  # a bug must cost one connection, never the port
                        log.exception("unexpected error in the DICOM listener; connection closed")
                        if key.data is not None:
                            self._close(key.data, selector)
                self._expire(selector)
        finally:
            for entry in list(self._pending.values()):
                self._close(entry, selector)
            selector.close()
            listener.close()

    def _next_wait(self) -> float:
        if not self._pending:
            return 0.2
        soonest = min(entry.deadline for entry in self._pending.values())
        return max(0.0, min(0.2, soonest - time.monotonic()))

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        for _ in range(64):  # take what is waiting, without starving the pending connections
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the backlog keeps them for later
                log.warning("cannot accept a DICOM connection: %s", exc.strerror or exc)
                return
            host = address[0]
            mine = [entry for entry in self._pending.values() if entry.address[0] == host]
            if len(mine) >= self.node.max_pending_per_address:
                self._evict(min(mine, key=lambda e: e.deadline), selector,
                            f"{len(mine)} connections from this address were waiting to associate "
                            "([node] max_pending_per_address)")
            elif len(self._pending) >= self.node.max_pending:
                self._evict(min(self._pending.values(), key=lambda e: e.deadline), selector,
                            f"{len(self._pending)} connections were waiting to associate "
                            "([node] max_pending)")
            sock.setblocking(False)
            entry = _Pending(sock, address, time.monotonic() + self.node.acse_timeout)
            self._pending[sock.fileno()] = entry
            selector.register(sock, selectors.EVENT_READ, entry)

    def _evict(self, entry: _Pending, selector: selectors.BaseSelector, why: str) -> None:
        """Make room for a new connection: the one that has waited longest goes.

        A legitimate requestor sends its A-ASSOCIATE-RQ in milliseconds, so
        under a flood of slow or silent connections the newest one is the
        likeliest to be real; the oldest has had its chance. One warning per
        REFUSAL_LOG_EVERY seconds per address, with the count in between.
        """
        host = entry.address[0]
        self._close(entry, selector)
        now = time.monotonic()
        last, count = self._refusals.get(host, (0.0, 0))
        if now - last >= REFUSAL_LOG_EVERY:
            extra = f" ({count} more since the last warning)" if count else ""
            log.warning("closed a connection from %s before association to make room: %s%s", host, why,
                        extra)
            self._refusals[host] = (now, 0)
        else:
            self._refusals[host] = (last, count + 1)
        if len(self._refusals) > 4096:
            self._refusals.clear()

    def _readable(self, entry: _Pending, selector: selectors.BaseSelector) -> None:
        try:
            if entry.draining:
                data = entry.sock.recv(READ_STEP)
                if not data:
                    self._close(entry, selector)
                return
            want = self._wanted(entry)
            data = entry.sock.recv(min(READ_STEP, want))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(entry, selector)
            return
        if not data:
            self._close(entry, selector)  # the peer left before associating
            return
        entry.buffer += data
        try:
            if len(entry.buffer) >= 6:
                pdu_type, length = pdu.parse_header(bytes(entry.buffer[:6]))
                self._check_header(pdu_type, length)
                if len(entry.buffer) == 6 + length:
                    self._associate(entry, selector)
        except pdu.Abort as exc:
            log.warning("connection from %s aborted before association: %s", entry.address[0], exc)
            self._drain(entry, pdu.abort(exc.source, exc.reason))

    @staticmethod
    def _wanted(entry: _Pending) -> int:
        if len(entry.buffer) < 6:
            return 6 - len(entry.buffer)
        return 6 + pdu.parse_header(bytes(entry.buffer[:6]))[1] - len(entry.buffer)

    @staticmethod
    def _check_header(pdu_type: int, length: int) -> None:
        if pdu_type not in pdu.PDU_TYPES:
            raise pdu.Abort(f"unrecognized PDU type {pdu_type:#04x} where an A-ASSOCIATE-RQ was due",
                            pdu.UNRECOGNIZED_PDU)
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            raise pdu.Abort(f"PDU type {pdu_type:#04x} where an A-ASSOCIATE-RQ was due", pdu.UNEXPECTED_PDU)
        if length > pdu.MAX_ASSOCIATE_RQ:
            raise pdu.Abort(f"A-ASSOCIATE-RQ declares {length} bytes, more than the {pdu.MAX_ASSOCIATE_RQ} "
                            "we read")
        if length < 68:
            raise pdu.Abort(f"A-ASSOCIATE-RQ declares {length} bytes, less than its 68-byte fixed part")

    def _associate(self, entry: _Pending, selector: selectors.BaseSelector) -> None:
        """A complete A-ASSOCIATE-RQ: reject, or hand the connection to an association thread."""
        request = associate.parse_associate_rq(bytes(entry.buffer[6:]))
        entry.buffer = bytearray()
        peer = Peer(request.calling_ae, request.called_ae, entry.address[0], entry.address[1])
        try:
            associate.check(request, self.node.ae_title, self.node.allowed_callers, self.node.check_called_ae)
        except pdu.Reject as exc:
            self._reject(entry, peer, exc)
            return
        allowed = peers.match(self.known, request.calling_ae, entry.address[0]) if self.known else None
        if self.known and allowed is None:
            self._reject(entry, peer, pdu.Reject(
                peers.refusal(self.known, request.calling_ae, entry.address[0]),
                pdu.REJECTED_PERMANENT, pdu.RJ_USER, pdu.RJ_CALLING_AE))
            return
        contexts: dict[int, tuple[str, str]] = {}
        results = []
        storage: set[str] = set()
        for proposed in request.contexts:
            result, syntax = negotiation.choose(proposed.abstract_syntax, proposed.transfer_syntaxes,
                                                self.served)
            if result == negotiation.ACCEPTANCE and not peers.allows(allowed, proposed.abstract_syntax):
                result, syntax = negotiation.USER_REJECTION, ""
            results.append((proposed.context_id, result, syntax))
            if result == negotiation.ACCEPTANCE:
                contexts[proposed.context_id] = (proposed.abstract_syntax, syntax)
                if proposed.abstract_syntax != negotiation.VERIFICATION and \
                        proposed.abstract_syntax not in self.served:
                    storage.add(proposed.abstract_syntax)
        accept = associate.associate_ac(request, results, storage, self.node.max_pdu,
                                        IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION)
        with self._lock:
            full = len(self._active) >= self.node.max_associations
            association = None
            if not full:
                association = Association(entry.sock, peer, contexts, request.max_pdu, self)
                self._active.add(association)
        if association is None:
            self._reject(entry, peer, pdu.Reject(
                f"{self.node.max_associations} associations are already open ([node] max_associations); "
                "the sender should retry later",
                pdu.REJECTED_TRANSIENT, pdu.RJ_PRESENTATION, pdu.RJ_LOCAL_LIMIT))
            return
        selector.unregister(entry.sock)
        del self._pending[entry.sock.fileno()]
        self._log_accepted(peer, request, contexts)
        threading.Thread(target=self._run, args=(association, accept), name="dicom-association",
                         daemon=True).start()

    def _run(self, association: Association, accept: bytes) -> None:
        try:
            association.run(accept)
        finally:
            with self._lock:
                self._active.discard(association)

    def _log_accepted(self, peer: Peer, request: associate.AssociateRequest,
                      contexts: dict[int, tuple[str, str]]) -> None:
        if request.called_ae != self.node.ae_title:
            log.info("association from %s calls us %s, not %s (accepted anyway)", peer,
                     printable(request.called_ae), self.node.ae_title)
        if self.known and len(contexts) < len(request.contexts):
            refused = sorted({printable(c.abstract_syntax) for c in request.contexts
                              if c.context_id not in contexts and negotiation.choose(
                                  c.abstract_syntax, c.transfer_syntaxes)[0] == negotiation.ACCEPTANCE})
            if refused:
                log.warning("association from %s: presentation contexts refused because its [[peer]] entry "
                            "lacks their service (add it to services): %s", peer, ", ".join(refused))
        if not contexts:
            proposed = sorted({printable(c.abstract_syntax) for c in request.contexts})
            log.warning("association from %s: none of its presentation contexts can be served "
                        "(proposed %s)", peer, ", ".join(proposed) or "none")
        else:
            log.info("association from %s accepted (%d presentation contexts)", peer, len(contexts))

    def _reject(self, entry: _Pending, peer: Peer, exc: pdu.Reject) -> None:
        self._drain(entry, pdu.associate_rj(exc.result, exc.source, exc.reason))
        self.handlers.rejected(peer, str(exc))

    def _drain(self, entry: _Pending, reply: bytes) -> None:
        """Send our last PDU, then wait (Sta13) for the peer to close, at most artim_timeout."""
        entry.buffer = bytearray()
        entry.draining = True
        entry.deadline = time.monotonic() + self.node.artim_timeout
        with contextlib.suppress(OSError):
            entry.sock.send(reply)
            entry.sock.shutdown(socket.SHUT_WR)

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for entry in [e for e in self._pending.values() if e.deadline <= now]:
            if not entry.draining:
                log.warning("connection from %s sent no complete A-ASSOCIATE-RQ within [node] "
                            "acse_timeout (%g s); closed", entry.address[0], self.node.acse_timeout)
            self._close(entry, selector)

    def _close(self, entry: _Pending, selector: selectors.BaseSelector) -> None:
        self._pending.pop(entry.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(entry.sock)
        with contextlib.suppress(OSError):
            entry.sock.close()
