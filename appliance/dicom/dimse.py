"""DIMSE dispatch: what the acceptor does with a complete command set, keyed by command field.

Like pynetdicom's event handlers, a table maps each request's Command Field
to a function `handler(association, command) -> Operation | None`. A command
without a dataset is answered at once and returns None; one with a dataset
returns an `Operation` that receives the dataset fragments as they arrive
(`data`), then `complete()` after the last one, or `abandon()` if the
association ends first. A new service (C-FIND, C-MOVE, N-ACTION ...) is one
more entry in `DEFAULT_DISPATCH` or in the table given to the Acceptor; the
Upper Layer does not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from appliance.dicom import command
from appliance.dicom.spool import Spool, file_meta
from appliance.peertext import printable

if TYPE_CHECKING:
    from appliance.dicom.association import Association

log = logging.getLogger("appliance.dicom")

UNRECOGNIZED_OPERATION = 0x0211
CANNOT_UNDERSTAND = 0xC000


@dataclass
class Peer:
    calling_ae: str
    called_ae: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{printable(self.calling_ae)}@{self.address}:{self.port}"


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
    """What the service behind the acceptor provides (scp.DicomService)."""

    def store(self, request: StoreRequest) -> tuple[int, str]: ...
    def echo(self, peer: Peer) -> int: ...
    def rejected(self, peer: Peer, reason: str) -> None: ...
    def new_spool_path(self) -> Path: ...
    def closed(self, peer: Peer) -> None: ...


@dataclass(frozen=True)
class Command:
    """A complete command set and the presentation context it came on."""

    fields: dict[int, bytes]
    context_id: int
    abstract_syntax: str
    transfer_syntax: str

    @property
    def command_field(self) -> int:
        return command.us(self.fields, command.COMMAND_FIELD)

    @property
    def message_id(self) -> int:
        return command.us(self.fields, command.MESSAGE_ID, 0)

    @property
    def has_dataset(self) -> bool:
        return command.us(self.fields, command.DATASET_TYPE, command.NO_DATASET) != command.NO_DATASET

    @property
    def sop_class(self) -> str:
        return command.ui(self.fields, command.AFFECTED_SOP_CLASS)

    @property
    def sop_instance(self) -> str:
        return command.ui(self.fields, command.AFFECTED_SOP_INSTANCE)


class Operation(Protocol):
    def data(self, chunk: memoryview) -> None: ...
    def complete(self) -> None: ...
    def abandon(self) -> None: ...


Handler = Callable[["Association", Command], "Operation | None"]


def c_echo(association: Association, cmd: Command) -> Operation | None:
    status = association.handlers.echo(association.peer)
    association.respond(cmd, command.C_ECHO_RSP, status)
    return _Discard(association, cmd, None) if cmd.has_dataset else None


def c_cancel(association: Association, cmd: Command) -> Operation | None:
    """C-CANCEL has no response; it stops the C-FIND/C-GET/C-MOVE it names, if still running."""
    target = command.us(cmd.fields, command.MESSAGE_ID_RESPONDED, 0)
    running = association.running.get(target)
    if running is not None:
        running.set()
        log.info("C-CANCEL from %s for message %d", association.peer, target)
    else:
        log.info("C-CANCEL from %s for message %d, which is not running; ignored", association.peer, target)
    return _Discard(association, cmd, None) if cmd.has_dataset else None


def unrecognized(association: Association, cmd: Command) -> Operation | None:
    """A request we do not serve gets 0x0211; a stray response gets nothing."""
    field_value = cmd.command_field
    response = None if field_value & 0x8000 else field_value | 0x8000
    if response is None:
        log.info("association from %s sent a response (%#06x) to an acceptor; ignored",
                 association.peer, field_value)
    if cmd.has_dataset:
        return _Discard(association, cmd, response, UNRECOGNIZED_OPERATION)
    if response is not None:
        association.respond(cmd, response, UNRECOGNIZED_OPERATION)
    return None


class _Discard:
    """Read and drop a dataset nobody wants, then answer (if `response`)."""

    def __init__(self, association: Association, cmd: Command, response: int | None,
                 status: int = UNRECOGNIZED_OPERATION) -> None:
        self.association, self.cmd, self.response, self.status = association, cmd, response, status

    def data(self, chunk: memoryview) -> None:
        pass

    def complete(self) -> None:
        if self.response is not None:
            self.association.respond(self.cmd, self.response, self.status)

    def abandon(self) -> None:
        pass


def c_store(association: Association, cmd: Command) -> Operation | None:
    if not cmd.has_dataset:
        association.respond(cmd, command.C_STORE_RSP, CANNOT_UNDERSTAND,
                            comment="C-STORE-RQ without a dataset")
        return None
    return _Store(association, cmd)


class _Store:
    """A C-STORE: the dataset goes to a spool file, then to the store handler."""

    def __init__(self, association: Association, cmd: Command) -> None:
        self.association = association
        self.cmd = cmd
        header = file_meta(
            sop_class=cmd.sop_class or cmd.abstract_syntax,
            sop_instance=cmd.sop_instance,
            transfer_syntax=cmd.transfer_syntax,
            source_ae=association.peer.calling_ae,
        )
        self.spool = Spool(association.handlers.new_spool_path(), header)

    def data(self, chunk: memoryview) -> None:
        self.spool.write(chunk)

    def complete(self) -> None:
        self.spool.close()
        request = StoreRequest(
            path=self.spool.path or Path("/nonexistent"),
            peer=self.association.peer,
            sop_class_uid=self.cmd.sop_class or self.cmd.abstract_syntax,
            sop_instance_uid=self.cmd.sop_instance,
            transfer_syntax=self.cmd.transfer_syntax,
            write_error=self.spool.error,
        )
        self.spool.path = None  # the store handler owns the file now
        status, comment = self.association.handlers.store(request)
        self.association.respond(self.cmd, command.C_STORE_RSP, status, request.sop_class_uid,
                                 request.sop_instance_uid, comment)

    def abandon(self) -> None:
        self.spool.discard()


DEFAULT_DISPATCH: dict[int, Handler] = {
    command.C_ECHO_RQ: c_echo,
    command.C_STORE_RQ: c_store,
    command.C_CANCEL_RQ: c_cancel,
}
