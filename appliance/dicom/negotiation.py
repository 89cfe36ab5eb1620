"""Which presentation contexts we accept: every storage class, in the sender's syntax.

The appliance never fails a sender because of its format. For each proposed
context whose abstract syntax is a storage SOP class (public, private or one
newer than pynetdicom), we accept the first transfer syntax the sender lists
that we can parse, so an object arrives as the modality made it, and the
store policy decides later what to keep.

The sender's order is kept on purpose (an acceptor that picks
in its own list order, as pynetdicom does, turns every JPEG 2000 sender that
also offers Implicit VR into an Implicit VR one). pynetdicom's service table
still decides which SOP classes are storage.
"""

from __future__ import annotations

import logging
import re
import threading

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import register_uid
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


# Presentation context results (PS3.8 9.3.3.2). User rejection is what a [[peer]] entry
# without the context's service gets: the syntax is supported, this caller may not use it.
ACCEPTANCE, USER_REJECTION, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 1, 3, 4


def choose(abstract_syntax: str, proposed: list[str],
           served: frozenset[str] = frozenset()) -> tuple[int, str]:
    """(result, transfer syntax) for one proposed context.

    Verification and a SOP class a service registered (`served`: Storage
    Commitment ...) take the first uncompressed syntax proposed; a storage
    class takes the first syntax we can parse, in the sender's order, so an
    object arrives as the modality made it.
    """
    if abstract_syntax == VERIFICATION or abstract_syntax in served:
        usable = [ts for ts in proposed if ts in UNCOMPRESSED]
    elif _storage_like(abstract_syntax) and _ensure_registered(abstract_syntax):
        usable = [ts for ts in proposed if ts in READABLE_SYNTAXES]
    else:
        return ABSTRACT_SYNTAX_NOT_SUPPORTED, ""
    if not usable:
        return TRANSFER_SYNTAXES_NOT_SUPPORTED, ""
    return ACCEPTANCE, usable[0]
