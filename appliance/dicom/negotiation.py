"""Which presentation contexts we accept: every storage class, in the sender's syntax.

The appliance never fails a sender because of its format. For each proposed
context whose abstract syntax is a storage SOP class (public, private or one
newer than pynetdicom), we accept the first transfer syntax the sender lists
that we can parse, so an object arrives as the modality made it, and the
store policy decides later what to keep.

pynetdicom picks a context's transfer syntax in the acceptor's own list
order, so the contexts are built per association, from the request, with
the sender's order preserved (see NOTES.md: a fixed list starting with
Implicit VR would turn every JPEG 2000 sender into an Implicit VR one).
"""

from __future__ import annotations

import logging
import re
import threading

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import register_uid
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

log = logging.getLogger("appliance.dicom")

VERIFICATION = "1.2.840.10008.1.1"
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
READABLE_SYNTAXES = frozenset(str(uid) for uid in AllTransferSyntaxes)
_UID_FORMAT = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_REGISTERED = 2000

_registered: set[str] = set()
_register_lock = threading.Lock()


STANDARD_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
STANDARD_ROOT = "1.2.840.10008."


def _storage_like(abstract_syntax: str) -> bool:
    """True for storage SOP classes, including retired and private ones.

    pynetdicom decides which service handles a class; one it serves otherwise
    (worklist, query/retrieve, storage commitment ...) is never taken for
    storage. A class it has no service for is storage when it lies under the
    standard storage root (retired ultrasound, nuclear medicine ...) or outside
    the standard root altogether (a vendor's private class).
    """
    if abstract_syntax in _registered:
        return True
    service = uid_to_service_class(abstract_syntax)
    if service is StorageServiceClass:
        return True
    if service is not ServiceClass:
        return False
    return abstract_syntax.startswith(STANDARD_STORAGE_ROOT) or not abstract_syntax.startswith(STANDARD_ROOT)


def _ensure_registered(abstract_syntax: str) -> bool:
    """Route C-STOREs of a storage class pynetdicom does not know to the storage service."""
    if uid_to_service_class(abstract_syntax) is StorageServiceClass:
        return True
    with _register_lock:
        if abstract_syntax in _registered:
            return True
        if len(_registered) >= MAX_REGISTERED or len(abstract_syntax) > 64:
            return False
        if not _UID_FORMAT.match(abstract_syntax):
            return False
        keyword = "UnknownStorage_" + abstract_syntax.replace(".", "_")
        register_uid(abstract_syntax, keyword, StorageServiceClass)
        _registered.add(abstract_syntax)
        log.info("accepting unknown storage SOP class %s", abstract_syntax)
        return True


def contexts_for(requested: list[PresentationContext]) -> list[PresentationContext]:
    """The supported contexts for one association, built from what was proposed."""
    supported: dict[str, PresentationContext] = {}
    verification = PresentationContext()
    verification.abstract_syntax = VERIFICATION
    verification.transfer_syntax = list(UNCOMPRESSED)
    supported[VERIFICATION] = verification
    for proposed in requested:
        abstract = str(proposed.abstract_syntax)
        if abstract == VERIFICATION or not _storage_like(abstract):
            continue
        syntaxes = [str(ts) for ts in proposed.transfer_syntax if str(ts) in READABLE_SYNTAXES]
        if not syntaxes or not _ensure_registered(abstract):
            continue
        context = supported.get(abstract)
        if context is None:
            context = PresentationContext()
            context.abstract_syntax = abstract
            context.transfer_syntax = []
            supported[abstract] = context
        for ts in syntaxes:
            if ts not in context.transfer_syntax:
                context.add_transfer_syntax(ts)
    return list(supported.values())
