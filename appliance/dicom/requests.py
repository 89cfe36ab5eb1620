"""DIMSE requests beyond C-ECHO and C-STORE, served by handlers that services register.

C-FIND, C-GET, C-MOVE, N-ACTION, N-EVENT-REPORT, N-CREATE and N-SET go
through here; C-STORE keeps its own fast path in dimse.py (spooled to disk,
never held in memory). As with pynetdicom's events, a service registers a
handler for (command field, SOP class); the handler receives the request and
its dataset (decoded by pynetdicom.dsutils) and yields (status, dataset)
pairs: pending statuses (0xFF00, 0xFF01) first, one final status last. The
response messages are pynetdicom's own (dimse_messages, from its primitives),
so their encoding is the one pynetdicom's tests cover.

The request dataset (a query identifier, an action's information) is small:
more than MAX_IDENTIFIER bytes is refused with 0xA700 "out of resources"
before anything is decoded. A request with no registered handler is answered
0x0211 "unrecognized operation" (PS3.7 C.4) and the association goes on.
C-FIND, C-GET and C-MOVE handlers run in a thread of their own, so a C-CANCEL
read meanwhile stops them: the next response is the final 0xFE00 "cancel".
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import decode

from appliance.dicom import command, dimse

if TYPE_CHECKING:
    from appliance.dicom.association import Association

log = logging.getLogger("appliance.dicom")

MAX_IDENTIFIER = 1 << 16
PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110
UNRECOGNIZED_OPERATION = 0x0211

C_FIND, C_GET, C_MOVE = 0x0020, 0x0010, 0x0021
N_EVENT_REPORT, N_SET, N_ACTION, N_CREATE = 0x0100, 0x0120, 0x0130, 0x0140
STREAMED = (C_FIND, C_GET, C_MOVE)  # these may be cancelled and run in their own thread

REQUESTED_SOP_CLASS = 0x00000003
REQUESTED_SOP_INSTANCE = 0x00001001
EVENT_TYPE_ID = 0x00001002
ACTION_TYPE_ID = 0x00001008

# command field -> (pynetdicom response primitive, its message class, the dataset's attribute)
_RESPONSES: dict[int, tuple[type, type, str]] = {
    C_FIND: (dimse_primitives.C_FIND, dimse_messages.C_FIND_RSP, "Identifier"),
    C_GET: (dimse_primitives.C_GET, dimse_messages.C_GET_RSP, "Identifier"),
    C_MOVE: (dimse_primitives.C_MOVE, dimse_messages.C_MOVE_RSP, "Identifier"),
    N_ACTION: (dimse_primitives.N_ACTION, dimse_messages.N_ACTION_RSP, "ActionReply"),
    N_EVENT_REPORT: (dimse_primitives.N_EVENT_REPORT, dimse_messages.N_EVENT_REPORT_RSP, "EventReply"),
    N_CREATE: (dimse_primitives.N_CREATE, dimse_messages.N_CREATE_RSP, "AttributeList"),
    N_SET: (dimse_primitives.N_SET, dimse_messages.N_SET_RSP, "AttributeList"),
}


@dataclass
class Request:
    """One request with its decoded dataset (None when it carried none)."""

    association: Association
    command: dimse.Command
    dataset: Dataset | None
    after: list[Callable[[], None]] = field(default_factory=list)  # run once the final response is sent

    @property
    def sop_class(self) -> str:
        return self.command.sop_class or command.ui(self.command.fields, REQUESTED_SOP_CLASS)

    @property
    def sop_instance(self) -> str:
        return self.command.sop_instance or command.ui(self.command.fields, REQUESTED_SOP_INSTANCE)

    def us(self, tag: int) -> int:
        return command.us(self.command.fields, tag, 0)


Handler = Callable[[Request], Iterator[tuple[int, Dataset | None]]]


@dataclass
class Services:
    """The handlers registered for (command field, SOP class), and for responses to our requests."""

    handlers: dict[tuple[int, str], Handler] = field(default_factory=dict)
    responses: dict[int, Callable[[Association, dimse.Command], None]] = field(default_factory=dict)

    def register(self, command_field: int, sop_class: str, handler: Handler) -> None:
        self.handlers[(command_field, sop_class)] = handler

    def on_response(self, command_field: int, handler: Callable[[Association, dimse.Command], None]) -> None:
        """`handler` is called for each response (e.g. N-EVENT-REPORT-RSP) a peer sends us."""
        self.responses[command_field] = handler

    def abstract_syntaxes(self) -> frozenset[str]:
        return frozenset(sop_class for _, sop_class in self.handlers)

    def dispatch_table(self) -> dict[int, dimse.Handler]:
        """Entries to add to dimse.DEFAULT_DISPATCH: every request above and the responses."""
        table: dict[int, dimse.Handler] = {field_value: self._request for field_value in _RESPONSES}
        for field_value in self.responses:
            table[field_value] = self._response
        return table

    def _request(self, association: Association, cmd: dimse.Command) -> dimse.Operation | None:
        operation = _Buffered(association, cmd, self)
        if not cmd.has_dataset:
            operation.complete()
            return None
        return operation

    def _response(self, association: Association, cmd: dimse.Command) -> dimse.Operation | None:
        self.responses[cmd.command_field](association, cmd)
        return dimse.unrecognized(association, cmd) if cmd.has_dataset else None  # drop its dataset


def respond(association: Association, cmd: dimse.Command, status: int, dataset: Dataset | None) -> None:
    """Send the response to `cmd` (pynetdicom's message for it) with `status` and `dataset`."""
    primitive_class, message_class, attribute = _RESPONSES[cmd.command_field]
    primitive = primitive_class()
    primitive.MessageIDBeingRespondedTo = cmd.message_id
    primitive.Status = status
    sop_class = cmd.sop_class or command.ui(cmd.fields, REQUESTED_SOP_CLASS)
    if sop_class:
        primitive.AffectedSOPClassUID = sop_class
    if cmd.command_field in (N_ACTION, N_EVENT_REPORT, N_CREATE, N_SET):
        instance = cmd.sop_instance or command.ui(cmd.fields, REQUESTED_SOP_INSTANCE)
        if instance:
            primitive.AffectedSOPInstanceUID = instance
    if cmd.command_field == N_ACTION:
        primitive.ActionTypeID = command.us(cmd.fields, ACTION_TYPE_ID, 0)
    if cmd.command_field == N_EVENT_REPORT:
        primitive.EventTypeID = command.us(cmd.fields, EVENT_TYPE_ID, 0)
    if dataset is not None:
        setattr(primitive, attribute, association.encode(dataset, cmd.context_id))
    message = message_class()
    message.primitive_to_message(primitive)
    association.send_message(message, cmd.context_id)


class _Buffered:
    """Collect a small request dataset, then run its handler (in a thread when cancellable)."""

    def __init__(self, association: Association, cmd: dimse.Command, services: Services) -> None:
        self.association, self.cmd, self.services = association, cmd, services
        self.buffer = bytearray()
        self.too_big = False

    def data(self, chunk: memoryview) -> None:
        if self.too_big or len(self.buffer) + len(chunk) > MAX_IDENTIFIER:
            self.too_big, self.buffer = True, bytearray()
            return
        self.buffer += chunk

    def abandon(self) -> None:
        self.buffer = bytearray()

    def complete(self) -> None:
        cmd, association = self.cmd, self.association
        handler = self.services.handlers.get((cmd.command_field, cmd.sop_class or
                                              command.ui(cmd.fields, REQUESTED_SOP_CLASS)))
        if handler is None:
            log.info("%#06x request from %s for a SOP class nobody serves here: 0x0211",
                     cmd.command_field, association.peer)
            respond(association, cmd, UNRECOGNIZED_OPERATION, None)
            return
        if self.too_big:
            log.warning("%#06x request from %s carries a dataset over %d bytes: refused (0xA700)",
                        cmd.command_field, association.peer, MAX_IDENTIFIER)
            respond(association, cmd, OUT_OF_RESOURCES, None)
            return
        dataset = None
        if cmd.has_dataset:
            try:
                dataset = association.decode(bytes(self.buffer), cmd.context_id)
            except Exception as exc:  # any malformed dataset: the request fails, not the association
                log.warning("%#06x request from %s: unreadable dataset: %s", cmd.command_field,
                            association.peer, exc)
                respond(association, cmd, 0xC000 if cmd.command_field in STREAMED else PROCESSING_FAILURE,
                        None)
                return
        request = Request(association, cmd, dataset)
        if cmd.command_field in STREAMED:
            association.running[cmd.message_id] = threading.Event()
            threading.Thread(target=_run, args=(handler, request), name="dicom-request", daemon=True).start()
        else:
            _run(handler, request)


def _run(handler: Handler, request: Request) -> None:
    """Send each (status, dataset) the handler yields; stop at the first final status or a cancel."""
    association, cmd = request.association, request.command
    cancelled = association.running.get(cmd.message_id)
    responses = handler(request)
    try:
        for status, dataset in responses:
            if cancelled is not None and cancelled.is_set():
                log.info("%#06x from %s cancelled (C-CANCEL): 0xFE00", cmd.command_field, association.peer)
                respond(association, cmd, CANCEL, None)
                return
            respond(association, cmd, status, dataset)
            if status not in PENDING:
                for then in request.after:
                    then()
                return
        log.error("%#06x handler ended without a final status; answered 0x0110", cmd.command_field)
        respond(association, cmd, PROCESSING_FAILURE, None)
    except Exception:  # a service's bug costs this request, never the association
        log.exception("%#06x handler failed; answered 0x0110", cmd.command_field)
        respond(association, cmd, PROCESSING_FAILURE, None)
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            close()
        association.running.pop(cmd.message_id, None)


def decode_dataset(data: bytes, transfer_syntax: str) -> Dataset:
    """A request dataset in its presentation context's (uncompressed) transfer syntax."""
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    little = transfer_syntax != "1.2.840.10008.1.2.2"
    return decode(io.BytesIO(data), implicit, little)
