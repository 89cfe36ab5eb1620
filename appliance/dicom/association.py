"""One established association (PS3.8 state Sta6): the P-DATA loop, release and abort.

Every length is checked before anything is read: a P-DATA-TF against the
maximum we announced, each PDV against its PDU, a command set against
MAX_COMMAND. Command fragments (small, bounded) are collected in memory;
dataset fragments go from the socket through one CHUNK-sized buffer to the
operation (for a C-STORE, the spool file). `dimse_timeout` bounds one whole
DIMSE message, from the first byte of its first PDU to its last fragment;
`network_timeout` bounds the silence between messages.

Anything malformed ends the association with A-ABORT (service provider and
the PS3.8 9.3.8 reason); every way out removes the spool file of an
unfinished message, releases the slot and, through `Handlers.closed`, what
the service holds for this thread (its index connection). After A-RELEASE-RP
or our A-ABORT the peer is given `artim_timeout` to close the connection
(state Sta13), then it is closed.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from appliance.dicom import command, dimse, pdu

if TYPE_CHECKING:
    from pynetdicom.dimse_messages import DIMSEMessage

    from appliance.dicom.acceptor import Acceptor

log = logging.getLogger("appliance.dicom")

CHUNK = 1 << 18  # the copy buffer: the bulk of an association's memory
MAX_COMMAND = 1 << 16  # a command set is a few hundred bytes; this is generous


class Association:
    """The established phase of one association, run in its own thread."""

    def __init__(self, sock: socket.socket, peer: dimse.Peer, contexts: dict[int, tuple[str, str]],
                 peer_max_pdu: int, acceptor: Acceptor) -> None:
        self.sock = sock
        self.peer = peer
        self.contexts = contexts
        self.peer_max_pdu = peer_max_pdu
        self.acceptor = acceptor
        self.node = acceptor.node
        self.handlers = acceptor.handlers
        self.dispatch = acceptor.dispatch
        self.reader = pdu.Reader(sock, self.node.network_timeout)
        self.buffer = bytearray(CHUNK)
        self.command = bytearray()
        self.command_context = 0
        self.operation: dimse.Operation | None = None
        self.operation_context = 0
        self.send_lock = threading.Lock()  # a streamed response and the reader's replies interleave
        self.running: dict[int, threading.Event] = {}  # message ID -> set by C-CANCEL
        self.message_ids = itertools.count(1)  # for the requests we send (N-EVENT-REPORT)
        self.closed = threading.Event()

    # --- life cycle -----------------------------------------------------------------

    def run(self, accept: bytes) -> None:
        """Send the A-ASSOCIATE-AC, serve, and clean up whatever way it ends."""
        try:
            self.sock.settimeout(self.node.network_timeout)  # blocking, but never forever
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(accept)
            self._serve()
        except pdu.Abort as exc:
            log.warning("association from %s aborted: %s", self.peer, exc)
            self._send(pdu.abort(exc.source, exc.reason))
        except command.CommandError as exc:
            log.warning("association from %s aborted: unreadable command set: %s", self.peer, exc)
            self._send(pdu.abort(pdu.SERVICE_PROVIDER, pdu.INVALID_PARAMETER))
        except pdu.DeadlineExceeded:
            log.warning("association from %s aborted: a DIMSE message took longer than [node] "
                        "dimse_timeout (%g s)", self.peer, self.node.dimse_timeout)
            self._send(pdu.abort())
        except TimeoutError:
            log.warning("association from %s aborted: nothing received for [node] network_timeout "
                        "(%g s)", self.peer, self.node.network_timeout)
            self._send(pdu.abort())
        except pdu.PeerClosed:
            log.info("association from %s: connection closed by the peer", self.peer)
        except pdu.PeerAborted:
            log.warning("association from %s aborted by the peer", self.peer)
        except OSError as exc:
            log.warning("association from %s: network error: %s", self.peer, exc.strerror or exc)
        finally:
            if self.operation is not None:
                self.operation.abandon()  # a dataset cut off: its spool file goes now
                self.operation = None
            self.command = bytearray()
            self.buffer = bytearray()
            self.closed.set()
            for cancelled in list(self.running.values()):
                cancelled.set()
            with contextlib.suppress(Exception):
                self.handlers.closed(self.peer)
            self._await_close()

    def _await_close(self) -> None:
        """Sta13: give the peer artim_timeout to close, reading (and dropping) what it still sends."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.node.artim_timeout
            scratch = bytearray(4096)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if self.sock.recv_into(scratch) == 0:
                    break
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Called at shutdown for an association that did not finish in time."""
        self._send(pdu.abort())
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # --- PDUs -------------------------------------------------------------------------

    def _in_message(self) -> bool:
        return bool(self.command) or self.operation is not None

    def _start_clock(self) -> None:
        if self.reader.deadline is None:
            self.reader.deadline = time.monotonic() + self.node.dimse_timeout

    def _next_header(self) -> tuple[int, int]:
        head = bytearray(6)
        view = memoryview(head)
        self.reader.arm()
        got = self.reader.recv_into(view)  # waiting here is idle time, unless a message is open
        self._start_clock()
        while got < 6:
            self.reader.arm()
            got += self.reader.recv_into(view[got:])
        return pdu.parse_header(bytes(head))

    def _serve(self) -> None:
        while True:
            pdu_type, length = self._next_header()
            if pdu_type == pdu.P_DATA_TF:
                self._p_data(length)
            elif pdu_type == pdu.A_RELEASE_RQ:
                if length != 4:
                    raise pdu.Abort(f"A-RELEASE-RQ declares {length} bytes (4 expected)")
                self.reader.arm()
                self.reader.read_small(4)
                if self._in_message():
                    log.warning("association from %s released in the middle of a message; "
                                "the message is dropped", self.peer)
                self._send(pdu.release_rp())
                log.info("association from %s released", self.peer)
                return
            elif pdu_type == pdu.A_ABORT:
                raise pdu.PeerAborted()  # its body is not read: it may declare any length
            elif pdu_type in pdu.PDU_TYPES:
                raise pdu.Abort(f"unexpected PDU type {pdu_type:#04x} in an established association",
                                pdu.UNEXPECTED_PDU)
            else:
                raise pdu.Abort(f"unrecognized PDU type {pdu_type:#04x}", pdu.UNRECOGNIZED_PDU)
            if not self._in_message():
                self.reader.deadline = None

    def _p_data(self, length: int) -> None:
        limit = self.node.max_pdu
        if limit and length > limit:
            raise pdu.Abort(f"P-DATA-TF of {length} bytes; we announced at most {limit} ([node] max_pdu)")
        if length < 6:
            raise pdu.Abort(f"P-DATA-TF of {length} bytes holds no PDV")
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise pdu.Abort("P-DATA-TF ends inside a PDV header")
            self.reader.arm()
            pdv_length, context_id, control = struct.unpack(">IBB", self.reader.read_small(6))
            if pdv_length < 2 or pdv_length + 4 > remaining:
                raise pdu.Abort(f"PDV of {pdv_length} bytes does not fit its P-DATA-TF "
                                f"({remaining - 4} bytes left)")
            remaining -= 4 + pdv_length
            if context_id not in self.contexts:
                raise pdu.Abort(f"PDV on presentation context {context_id}, which was not accepted")
            self._start_clock()
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(context_id, pdv_length - 2, last)
            else:
                self._dataset_fragment(context_id, pdv_length - 2, last)

    def _command_fragment(self, context_id: int, length: int, last: bool) -> None:
        if self.operation is not None:
            raise pdu.Abort("a command fragment arrived in the middle of a dataset",
                            pdu.UNEXPECTED_PARAMETER)
        if self.command and context_id != self.command_context:
            raise pdu.Abort("command fragments on two presentation contexts", pdu.UNEXPECTED_PARAMETER)
        if len(self.command) + length > MAX_COMMAND:
            raise pdu.Abort(f"command set of more than {MAX_COMMAND} bytes")
        self.command_context = context_id
        self.reader.arm()
        self.command += self.reader.read_small(length)
        if not last:
            return
        data, self.command = bytes(self.command), bytearray()
        abstract, syntax = self.contexts[context_id]
        cmd = dimse.Command(command.parse(data), context_id, abstract, syntax)
        handler = self.dispatch.get(cmd.command_field, dimse.unrecognized)
        operation = handler(self, cmd)
        if cmd.has_dataset:
            self.operation = operation or dimse.unrecognized(self, cmd)
            self.operation_context = context_id
        else:
            self.reader.deadline = None  # the message is complete

    def _dataset_fragment(self, context_id: int, length: int, last: bool) -> None:
        operation = self.operation
        if operation is None or context_id != self.operation_context:
            raise pdu.Abort("a dataset fragment without its command on this presentation context",
                            pdu.UNEXPECTED_PARAMETER)
        view = memoryview(self.buffer)
        while length > 0:
            self.reader.arm()
            count = self.reader.recv_into(view[: min(length, CHUNK)])
            length -= count
            operation.data(view[:count])
        if last:
            self.operation = None
            self.reader.deadline = None
            operation.complete()

    # --- sending -------------------------------------------------------------------------

    def respond(self, cmd: dimse.Command, command_field: int, status: int, sop_class: str | None = None,
                sop_instance: str = "", comment: str = "") -> None:
        """Send a response command set (no dataset) on the request's context."""
        body = command.response(command_field, cmd.message_id, status,
                                cmd.sop_class if sop_class is None else sop_class, sop_instance, comment)
        self._send(pdu.p_data(cmd.context_id, body, max_pdu=self.peer_max_pdu))

    def send_message(self, message: DIMSEMessage, context_id: int) -> bool:
        """Send one of pynetdicom's DIMSE messages, fragmented to the peer's maximum PDU."""
        data = b""
        for part in message.encode_msg(context_id, self.peer_max_pdu or 0):
            tf = P_DATA_TF()
            tf.from_primitive(part)
            data += tf.encode()
        return self._send(data)

    def encode(self, dataset: Dataset, context_id: int) -> io.BytesIO:
        """`dataset` in the transfer syntax of presentation context `context_id`."""
        syntax = self.contexts[context_id][1]
        data = encode(dataset, syntax == "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2")
        if data is None:
            raise ValueError("dataset cannot be encoded")
        return io.BytesIO(data)

    def decode(self, data: bytes, context_id: int) -> Dataset:
        from appliance.dicom.requests import decode_dataset

        return decode_dataset(data, self.contexts[context_id][1])

    def _send(self, data: bytes) -> bool:
        try:
            with self.send_lock:
                self.sock.sendall(data)
            return True
        except OSError as exc:
            log.debug("cannot send to %s: %s", self.peer, exc)
            return False
