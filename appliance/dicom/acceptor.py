"""The association acceptor: one thread per association, PDUs straight off the socket.

For each association: read the A-ASSOCIATE-RQ, apply the calling-AE
whitelist and the association limit, answer with the contexts we can serve
(negotiation.py), then loop over P-DATA: command fragments are collected
and decoded, dataset fragments are written to a spool file in the archive's
temp area as they arrive (bounded memory, no copy afterwards), and when the
last one is in, the store handler answers with the status the archive gave.

What is done with an object is not this module's business: it calls
`handlers.store(path, ...)` and `handlers.echo(...)`, like pynetdicom's event
handlers, so the network layer never knows about storage.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance import __version__
from appliance.config import NodeSettings
from appliance.dicom import command, negotiation, pdu

log = logging.getLogger("appliance.dicom")

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.13338763814570235085532935217951476504"
IMPLEMENTATION_VERSION = f"GATEWAY_{__version__}"[:16]
CHUNK = 1 << 18


def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, group_element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, group_element, vr, len(value)) + value


def _text(value: str, pad: bytes, limit: int) -> bytes:
    raw = value.encode("ascii", "replace")[:limit]
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information (PS3.10 7.1), built by hand.

    pydicom's writer costs ~7 % of a C-STORE for these 200 bytes; the values
    come from the command set and the accepted context, hostile lengths cut.
    """
    body = _meta_element(0x0001, b"OB", b"\x00\x01")
    body += _meta_element(0x0002, b"UI", _text(sop_class, b"\0", 64))
    body += _meta_element(0x0003, b"UI", _text(sop_instance, b"\0", 64))
    body += _meta_element(0x0010, b"UI", _text(transfer_syntax, b"\0", 64))
    body += _meta_element(0x0012, b"UI", _text(IMPLEMENTATION_CLASS_UID, b"\0", 64))
    body += _meta_element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION, b" ", 16))
    if source_ae:
        body += _meta_element(0x0016, b"AE", _text(source_ae, b" ", 16))
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + length + body


@dataclass
class Peer:
    calling_ae: str
    called_ae: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.calling_ae}@{self.address}:{self.port}"


@dataclass(frozen=True)
class StoreRequest:
    """One received object, complete in its spool file."""

    path: Path
    peer: Peer
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    write_error: OSError | None


class Handlers(Protocol):
    def store(self, request: StoreRequest) -> tuple[int, str]: ...
    def echo(self, peer: Peer) -> int: ...
    def rejected(self, peer: Peer, reason: str) -> None: ...
    def new_spool_path(self) -> Path: ...


@dataclass
class _Message:
    """A DIMSE message being assembled from PDVs."""

    command: bytearray = field(default_factory=bytearray)
    fields: dict[int, bytes] | None = None
    context_id: int = 0
    spool: io.RawIOBase | None = None
    spool_path: Path | None = None
    write_error: OSError | None = None


class Association:
    def __init__(self, sock: socket.socket, address: tuple[str, int], acceptor: Acceptor) -> None:
        self.sock = sock
        self.address = address
        self.acceptor = acceptor
        self.node = acceptor.node
        self.handlers = acceptor.handlers
        self.peer = Peer("", "", address[0], address[1])
        self.contexts: dict[int, tuple[str, str]] = {}
        self.buffer = bytearray(CHUNK)
        self.message = _Message()  # the DIMSE message being received

    # --- association set-up ------------------------------------------------------

    def run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.node.acse_timeout)
        try:
            if not self._negotiate():
                return
            self.sock.settimeout(self.node.network_timeout)
            self._serve()
        except pdu.PeerClosed:
            log.info("association from %s: connection closed by the peer", self.peer)
        except TimeoutError:
            log.warning("association from %s: nothing received for %.0f s; aborting", self.peer,
                        self.node.network_timeout)
            self._send(pdu.abort())
        except (pdu.ProtocolError, command.CommandError) as exc:
            log.warning("association from %s aborted: %s", self.peer, exc)
            self._send(pdu.abort(source=2, reason=0))
        except OSError as exc:
            log.warning("association from %s: network error: %s", self.peer, exc)
        finally:
            self._discard(self.message)  # a dataset cut off by the peer, a timeout, an abort

    def _negotiate(self) -> bool:
        pdu_type, length = pdu.read_header(self.sock)
        if pdu_type != pdu.A_ASSOCIATE_RQ or length > pdu.MAX_ASSOCIATE_RQ:
            raise pdu.ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}")
        request = pdu.parse_associate_rq(pdu.read_exact(self.sock, length))
        self.peer = Peer(request.calling_ae, request.called_ae, *self.address)
        if self.node.allowed_callers and request.calling_ae not in self.node.allowed_callers:
            reason = (
                f"calling AE title {request.calling_ae!r} is not in [node] allowed_callers "
                f"({', '.join(self.node.allowed_callers)}); add it there to let it in"
            )
            self._send(pdu.associate_rj(1, 1, 3))  # permanent, service user, calling AE unknown
            self.handlers.rejected(self.peer, reason)
            return False
        if not self.acceptor.admit(self):
            reason = (
                f"{self.node.max_associations} associations are already open ([node] "
                "max_associations); the sender should retry later"
            )
            self._send(pdu.associate_rj(2, 3, 2))  # transient, provider, local limit exceeded
            self.handlers.rejected(self.peer, reason)
            return False
        results = []
        for proposed in request.contexts:
            result, syntax = negotiation.choose(proposed.abstract_syntax, proposed.transfer_syntaxes)
            results.append((proposed.context_id, result, syntax))
            if result == negotiation.ACCEPTANCE:
                self.contexts[proposed.context_id] = (proposed.abstract_syntax, syntax)
        self._send(pdu.associate_ac(request, results, self.node.max_pdu, IMPLEMENTATION_CLASS_UID,
                                    IMPLEMENTATION_VERSION))
        if request.called_ae != self.node.ae_title:
            log.info("association from %s calls us %r, not %r (accepted anyway)", self.peer,
                     request.called_ae, self.node.ae_title)
        if not self.contexts:
            proposed = sorted({c.abstract_syntax for c in request.contexts})
            log.warning("association from %s: none of its presentation contexts can be served "
                        "(proposed %s)", self.peer, ", ".join(proposed) or "none")
        else:
            log.info("association from %s accepted (%d presentation contexts)", self.peer,
                     len(self.contexts))
        return True

    # --- the P-DATA loop ----------------------------------------------------------

    def _serve(self) -> None:
        while True:
            pdu_type, length = pdu.read_header(self.sock)
            if pdu_type == pdu.P_DATA_TF:
                self._p_data(length)
            elif pdu_type == pdu.A_RELEASE_RQ:
                pdu.read_exact(self.sock, length)
                self._send(pdu.release_rp())
                log.info("association from %s released", self.peer)
                return
            elif pdu_type == pdu.A_ABORT:
                pdu.read_exact(self.sock, length)
                log.warning("association from %s aborted by the peer", self.peer)
                return
            else:
                raise pdu.ProtocolError(f"unexpected PDU type {pdu_type:#04x} during the association")

    def _p_data(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise pdu.ProtocolError("P-DATA-TF ends inside a PDV header")
            head = pdu.read_exact(self.sock, 6)
            pdv_length, context_id, control = struct.unpack(">IBB", head)
            data_length = pdv_length - 2
            remaining -= 4 + pdv_length
            if data_length < 0 or remaining < 0:
                raise pdu.ProtocolError("PDV length runs past its P-DATA-TF")
            if context_id not in self.contexts:
                raise pdu.ProtocolError(f"PDV on presentation context {context_id}, which was not accepted")
            last = bool(control & 0x02)
            message = self.message
            if control & 0x01:
                message.command += pdu.read_exact(self.sock, data_length)
                message.context_id = context_id
                if last:
                    self.message = self._command_complete(message)
            else:
                if message.fields is None or context_id != message.context_id:
                    raise pdu.ProtocolError("dataset fragment without its C-STORE command")
                self._copy_to_spool(message, data_length)
                if last:
                    self.message = self._store(message)

    def _command_complete(self, message: _Message) -> _Message:
        fields = command.parse(bytes(message.command))
        message.fields = fields
        field_value = command.us(fields, command.COMMAND_FIELD)
        message_id = command.us(fields, command.MESSAGE_ID, 0)
        has_dataset = command.us(fields, command.DATASET_TYPE, command.NO_DATASET) != command.NO_DATASET
        sop_class = command.ui(fields, command.AFFECTED_SOP_CLASS)
        if field_value == command.C_ECHO_RQ:
            status = self.handlers.echo(self.peer)
            self._respond(message.context_id, command.C_ECHO_RSP, message_id, status, sop_class)
            return _Message()
        if field_value == command.C_STORE_RQ and has_dataset:
            self._open_spool(message)
            return message
        if has_dataset:
            raise pdu.ProtocolError(f"unsupported DIMSE command {field_value:#06x} with a dataset")
        # A DIMSE service we do not offer on this context: "unrecognized operation".
        self._respond(message.context_id, field_value | 0x8000, message_id, 0x0211, sop_class)
        return _Message()

    def _open_spool(self, message: _Message) -> None:
        fields = message.fields or {}
        abstract, syntax = self.contexts[message.context_id]
        header = file_meta(
            sop_class=command.ui(fields, command.AFFECTED_SOP_CLASS) or abstract,
            sop_instance=command.ui(fields, command.AFFECTED_SOP_INSTANCE),
            transfer_syntax=syntax,
            source_ae=self.peer.calling_ae,
        )
        message.spool_path = self.handlers.new_spool_path()
        try:
            message.spool = open(message.spool_path, "wb", buffering=0)  # noqa: SIM115
            message.spool.write(header)
        except OSError as exc:
            message.write_error = exc
            self._close_spool(message)

    def _copy_to_spool(self, message: _Message, length: int) -> None:
        """Move `length` bytes from the socket to the spool file, a chunk at a time."""
        view = memoryview(self.buffer)
        while length > 0:
            count = self.sock.recv_into(view[: min(length, CHUNK)])
            if count == 0:
                raise pdu.PeerClosed("connection closed inside a dataset")
            length -= count
            if message.spool is not None:
                try:
                    chunk = view[:count]
                    while chunk:
                        chunk = chunk[message.spool.write(chunk) :]
                except OSError as exc:  # disk full: keep reading, answer 0xA700 at the end
                    message.write_error = exc
                    self._close_spool(message)

    def _close_spool(self, message: _Message) -> None:
        if message.spool is not None:
            try:
                message.spool.close()
            except OSError as exc:
                message.write_error = message.write_error or exc
            message.spool = None

    def _store(self, message: _Message) -> _Message:
        fields = message.fields or {}
        self._close_spool(message)
        abstract, syntax = self.contexts[message.context_id]
        request = StoreRequest(
            path=message.spool_path or Path("/nonexistent"),
            peer=self.peer,
            sop_class_uid=command.ui(fields, command.AFFECTED_SOP_CLASS) or abstract,
            sop_instance_uid=command.ui(fields, command.AFFECTED_SOP_INSTANCE),
            transfer_syntax=syntax,
            write_error=message.write_error,
        )
        status, comment = self.handlers.store(request)
        self._respond(message.context_id, command.C_STORE_RSP, command.us(fields, command.MESSAGE_ID, 0),
                      status, request.sop_class_uid, request.sop_instance_uid, comment)
        return _Message()

    def _discard(self, message: _Message) -> None:
        """Remove the spool file of a message that will never be complete."""
        self._close_spool(message)
        if message.spool_path is not None:
            message.spool_path.unlink(missing_ok=True)
            message.spool_path = None

    def _respond(self, context_id: int, command_field: int, message_id: int, status: int,
                 sop_class: str, sop_instance: str = "", comment: str = "") -> None:
        body = command.response(command_field, message_id, status, sop_class, sop_instance, comment)
        self._send(pdu.p_data(context_id, body))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            log.debug("cannot send to %s: %s", self.peer, exc)

    def abort(self) -> None:
        """Called at shutdown for an association that did not finish in time."""
        self._send(pdu.abort())
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 32


class Acceptor:
    """Listens on the DICOM port and runs one Association per connection."""

    def __init__(self, node: NodeSettings, handlers: Handlers) -> None:
        self.node = node
        self.handlers = handlers
        self._active: set[Association] = set()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def admit(self, association: Association) -> bool:
        with self._lock:
            if len(self._active) >= self.node.max_associations:
                return False
            self._active.add(association)
            return True

    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def start(self) -> None:
        acceptor = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                association = Association(self.request, self.client_address, acceptor)
                try:
                    association.run()
                finally:
                    with acceptor._lock:
                        acceptor._active.discard(association)

        self._server = _Server((self.node.bind_address, self.node.dicom_port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="dicom-listener",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    @property
    def listening(self) -> bool:
        return self._server is not None

    def stop(self, grace: float, on_abort: Callable[[Association], None] | None = None) -> None:
        """Stop listening, let running associations finish, then abort the rest."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + grace
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            leftovers = list(self._active)
        for association in leftovers:
            log.warning("aborting association from %s at shutdown", association.peer)
            association.abort()
