"""A-ASSOCIATE-RQ in, A-ASSOCIATE-AC out (PS3.8 9.3.2-9.3.3, PS3.7 Annex D).

The request is parsed strictly from a buffer whose size was checked before
it was read (pdu.MAX_ASSOCIATE_RQ): every item and sub-item length must fit
in its parent, fixed-size fields must have their size, presentation context
IDs must be odd and unique. A structural fault raises `pdu.Abort`
(service provider, invalid PDU parameter value); a well-formed request we
refuse raises `pdu.Reject` with the result, source and reason of PS3.8
Table 9-21. Unknown user information sub-items are skipped, as PS3.7 D.3.3
asks.

The reply answers the negotiation sub-items a requestor proposes:
asynchronous operations window (we perform one operation at a time: 1/1),
SCP/SCU role selection (the requestor may be SCU; we never take the SCU
role, so a proposed SCP role for the requestor is refused), SOP class
extended negotiation for the storage classes we accepted (level 2 storage,
signatures unspecified, no coercion: PS3.4 B.3.1), and user identity with an
empty server response when a username (or username and passcode) asks for a
positive response — the identity is recorded, not verified.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from appliance.dicom import pdu
from appliance.peertext import printable

MAX_UID = 64


@dataclass
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class RoleProposal:
    sop_class: str
    scu: int
    scp: int


@dataclass
class UserIdentity:
    kind: int
    response_requested: bool
    primary: bytes


@dataclass
class AssociateRequest:
    called_ae: str
    calling_ae: str
    fixed: bytes  # bytes 0-67 of the body, echoed in the A-ASSOCIATE-AC
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    max_pdu: int = 0  # the largest P-DATA-TF the requestor takes; 0 = no limit
    implementation_class_uid: str = ""
    implementation_version: str = ""
    async_window: tuple[int, int] | None = None
    roles: list[RoleProposal] = field(default_factory=list)
    extended: dict[str, bytes] = field(default_factory=dict)
    identity: UserIdentity | None = None
    protocol_version: int = 1


def _text(raw: bytes) -> str:
    """Peer text as latin-1, so every byte survives for peertext.printable()."""
    return raw.decode("latin-1").strip(" \x00")


def _uid(raw: bytes, what: str) -> str:
    if not raw or len(raw) > MAX_UID:
        raise pdu.Abort(f"{what} has {len(raw)} bytes; a UID has 1 to {MAX_UID}")
    return raw.decode("latin-1").rstrip("\x00 ")


def _items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """Split `data` into (type, value) items; each must fit inside `data`."""
    items = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise pdu.Abort(f"{what}: an item header runs past the end ({len(data) - offset} bytes left)")
        item_type = data[offset]
        (length,) = struct.unpack_from(">H", data, offset + 2)
        if offset + 4 + length > len(data):
            raise pdu.Abort(f"{what}: item {item_type:#04x} declares {length} bytes, "
                            f"only {len(data) - offset - 4} remain")
        items.append((item_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return items


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """The A-ASSOCIATE-RQ in `body` (the PDU after its 6-byte header)."""
    if len(body) < 68:
        raise pdu.Abort(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its 68-byte fixed part")
    (version,) = struct.unpack_from(">H", body, 0)
    request = AssociateRequest(called_ae=_text(body[4:20]), calling_ae=_text(body[20:36]),
                               fixed=body[:68], protocol_version=version)
    seen_context_ids: set[int] = set()
    user_info = 0
    for item_type, value in _items(body[68:], "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            if request.application_context:
                raise pdu.Abort("A-ASSOCIATE-RQ has two application context items")
            request.application_context = _uid(value, "the application context name")
        elif item_type == 0x20:
            context = _parse_context(value)
            if context.context_id in seen_context_ids:
                raise pdu.Abort(f"presentation context ID {context.context_id} is proposed twice")
            seen_context_ids.add(context.context_id)
            request.contexts.append(context)
        elif item_type == 0x50:
            user_info += 1
            _parse_user_info(value, request)
        else:
            raise pdu.Abort(f"A-ASSOCIATE-RQ holds an item of unknown type {item_type:#04x}",
                            pdu.UNRECOGNIZED_PARAMETER)
    if user_info > 1:
        raise pdu.Abort("A-ASSOCIATE-RQ has two user information items")
    if not request.contexts:
        raise pdu.Abort("A-ASSOCIATE-RQ proposes no presentation context")
    return request


def _parse_context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise pdu.Abort(f"presentation context item of {len(value)} bytes (at least 4)")
    context_id = value[0]
    if context_id % 2 == 0:
        raise pdu.Abort(f"presentation context ID {context_id} is even; PS3.8 9.3.2.2 wants odd IDs 1-255")
    context = ProposedContext(context_id, "", [])
    for sub_type, sub in _items(value[4:], f"presentation context {context_id}"):
        if sub_type == 0x30:
            if context.abstract_syntax:
                raise pdu.Abort(f"presentation context {context_id} has two abstract syntaxes")
            context.abstract_syntax = _uid(sub, "an abstract syntax")
        elif sub_type == 0x40:
            context.transfer_syntaxes.append(_uid(sub, "a transfer syntax"))
        else:
            raise pdu.Abort(f"presentation context {context_id} holds a sub-item of unknown type "
                            f"{sub_type:#04x}", pdu.UNRECOGNIZED_PARAMETER)
    if not context.abstract_syntax or not context.transfer_syntaxes:
        raise pdu.Abort(f"presentation context {context_id} lacks its abstract syntax or transfer syntaxes")
    return context


def _parse_user_info(value: bytes, request: AssociateRequest) -> None:
    for sub_type, sub in _items(value, "user information"):
        if sub_type == 0x51:
            if len(sub) != 4:
                raise pdu.Abort(f"maximum length sub-item of {len(sub)} bytes (4 expected)")
            (request.max_pdu,) = struct.unpack(">I", sub)
        elif sub_type == 0x52:
            request.implementation_class_uid = _uid(sub, "the implementation class UID")
        elif sub_type == 0x55:
            if not 1 <= len(sub) <= 16:
                raise pdu.Abort(f"implementation version name of {len(sub)} bytes (1 to 16)")
            request.implementation_version = _text(sub)
        elif sub_type == 0x53:
            if len(sub) != 4:
                raise pdu.Abort(f"asynchronous operations window of {len(sub)} bytes (4 expected)")
            request.async_window = struct.unpack(">HH", sub)
        elif sub_type == 0x54:
            request.roles.append(_parse_role(sub))
        elif sub_type == 0x56:
            sop_class, info = _parse_extended(sub)
            request.extended.setdefault(sop_class, info)
        elif sub_type == 0x58:
            request.identity = _parse_identity(sub)
        # 0x57 (common extended negotiation) and unknown sub-items: no reply (PS3.7 D.3.3).


def _parse_role(sub: bytes) -> RoleProposal:
    if len(sub) < 4:
        raise pdu.Abort(f"role selection sub-item of {len(sub)} bytes")
    (uid_length,) = struct.unpack_from(">H", sub, 0)
    if len(sub) != 2 + uid_length + 2:
        raise pdu.Abort(f"role selection sub-item: UID length {uid_length} does not fit its {len(sub)} bytes")
    return RoleProposal(_uid(sub[2 : 2 + uid_length], "a role selection SOP class"), sub[-2], sub[-1])


def _parse_extended(sub: bytes) -> tuple[str, bytes]:
    if len(sub) < 2:
        raise pdu.Abort(f"extended negotiation sub-item of {len(sub)} bytes")
    (uid_length,) = struct.unpack_from(">H", sub, 0)
    if 2 + uid_length > len(sub):
        raise pdu.Abort(f"extended negotiation sub-item: UID length {uid_length} runs past "
                        f"its {len(sub)} bytes")
    return _uid(sub[2 : 2 + uid_length], "an extended negotiation SOP class"), sub[2 + uid_length :]


def _parse_identity(sub: bytes) -> UserIdentity:
    if len(sub) < 4:
        raise pdu.Abort(f"user identity sub-item of {len(sub)} bytes")
    kind, requested = sub[0], sub[1]
    (primary_length,) = struct.unpack_from(">H", sub, 2)
    end = 4 + primary_length
    if end + 2 > len(sub):
        raise pdu.Abort("user identity sub-item: primary field runs past the sub-item")
    (secondary_length,) = struct.unpack_from(">H", sub, end)
    if end + 2 + secondary_length != len(sub):
        raise pdu.Abort("user identity sub-item: secondary field does not end the sub-item")
    if kind not in (1, 2, 3, 4, 5):
        raise pdu.Abort(f"user identity type {kind} is not defined (1-5)", pdu.INVALID_PARAMETER)
    return UserIdentity(kind, requested == 1, sub[4:end])


# --- checks that reject rather than abort -------------------------------------


def check(request: AssociateRequest, our_ae: str, allowed_callers: tuple[str, ...],
          check_called_ae: bool) -> None:
    """Raise pdu.Reject for a well-formed request we refuse, in PS3.8's order of sources."""
    if not request.protocol_version & 0x0001:
        raise pdu.Reject(f"protocol version {request.protocol_version:#06x} lacks bit 0 (version 1)",
                         pdu.REJECTED_PERMANENT, pdu.RJ_ACSE, pdu.RJ_PROTOCOL_VERSION)
    if request.application_context != pdu.APPLICATION_CONTEXT:
        raise pdu.Reject(f"application context name {printable(request.application_context)} is not DICOM's "
                         f"{pdu.APPLICATION_CONTEXT}", pdu.REJECTED_PERMANENT, pdu.RJ_USER,
                         pdu.RJ_APPLICATION_CONTEXT)
    if not request.calling_ae:
        raise pdu.Reject("the calling AE title is empty", pdu.REJECTED_PERMANENT, pdu.RJ_USER,
                         pdu.RJ_CALLING_AE)
    if allowed_callers and request.calling_ae not in allowed_callers:
        # the caller's title is in the log line already (Peer), escaped
        raise pdu.Reject(f"calling AE title is not in [node] allowed_callers ({', '.join(allowed_callers)}); "
                         "add it there to let it in", pdu.REJECTED_PERMANENT, pdu.RJ_USER, pdu.RJ_CALLING_AE)
    if check_called_ae and request.called_ae != our_ae:
        raise pdu.Reject(f"it calls AE title {printable(request.called_ae)}, we are {our_ae} ([node] "
                         "check_called_ae = true)", pdu.REJECTED_PERMANENT, pdu.RJ_USER, pdu.RJ_CALLED_AE)


# --- the reply -------------------------------------------------------------------

STORAGE_APPLICATION_INFO = bytes([2, 0, 0, 0, 0, 0])  # level 2, signatures unspecified, no coercion


def associate_ac(request: AssociateRequest, results: list[tuple[int, int, str]], storage: set[str],
                 max_pdu: int, implementation_class_uid: str, implementation_version: str) -> bytes:
    """A-ASSOCIATE-AC; `results` holds (context id, result, transfer syntax) per proposed context,
    `storage` the abstract syntaxes accepted as storage (for extended negotiation)."""
    items = pdu.item(0x10, pdu.APPLICATION_CONTEXT.encode())
    for context_id, result, syntax in results:
        sub = pdu.item(0x40, syntax.encode() if result == 0 else b"")
        items += pdu.item(0x21, bytes([context_id, 0, result, 0]) + sub)
    user = pdu.item(0x51, struct.pack(">I", max_pdu))
    user += pdu.item(0x52, implementation_class_uid.encode())
    if request.async_window is not None:
        user += pdu.item(0x53, struct.pack(">HH", 1, 1))
    replied: set[str] = set()
    for role in request.roles:
        if role.sop_class in replied:
            continue
        replied.add(role.sop_class)
        uid = role.sop_class.encode("latin-1")
        user += pdu.item(0x54, struct.pack(">H", len(uid)) + uid + bytes([1 if role.scu else 0, 0]))
    user += pdu.item(0x55, implementation_version.encode()[:16])
    for sop_class in request.extended:
        if sop_class in storage:
            uid = sop_class.encode("latin-1")
            user += pdu.item(0x56, struct.pack(">H", len(uid)) + uid + STORAGE_APPLICATION_INFO)
    identity = request.identity
    if identity is not None and identity.response_requested and identity.kind in (1, 2):
        user += pdu.item(0x59, struct.pack(">H", 0))
    items += pdu.item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + request.fixed[4:36] + b"\0" * 32
    return pdu.associate_ac(fixed, items)
