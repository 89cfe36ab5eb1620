"""The store rule and the send rule, as pure functions of syntaxes.

Store rule ([storage] format): what the archive keeps of what it received.

    received \\ configured  uncompressed  lossless            lossy           as-received
    uncompressed           keep          compress lossless   compress lossy  keep
    lossless               decompress    keep                compress lossy  keep
    lossy                  decompress    keep lossy          keep            keep

Send rule (a destination's `accepts`, by preference): which syntaxes to
propose for one stored object, best first.

1. `uncompressed` means Explicit VR Little Endian, then Implicit VR Little
   Endian. Explicit VR Big Endian (retired, PS3.5 A.3) and Deflated
   Explicit VR Little Endian are proposed only when `accepts` names them.
2. The stored syntax comes first when `accepts` takes it (by class or by
   name): sending as stored costs nothing and changes nothing.
3. Then the other syntaxes of `accepts`, in its order, less those the
   object must not become: lossy data is never re-encoded losslessly (only
   bigger, never better) nor into another lossy syntax (a second generation
   of loss); Big Endian is never produced.
4. Explicit, then Implicit VR Little Endian close every list when not
   already in it: every DICOM node takes them.

docs/DESIGN.md ("The send rule") has the rule as a table, checked by a test.
"""

from __future__ import annotations

from pydicom import uid

from appliance.transcode.syntaxes import UNIVERSAL, class_of, expand, members, resolve

STORE_FORMATS = ("uncompressed", "lossless", "lossy", "as-received")


def store_target(received: str, configured: str, lossless_syntax: str, lossy_syntax: str) -> str | None:
    """The syntax to store an object received in `received`, or None to keep it as it is."""
    if configured not in STORE_FORMATS:
        raise ValueError(f"unknown store format {configured!r}; one of {', '.join(STORE_FORMATS)}")
    current = class_of(received)
    if configured == "as-received" or current is None:
        return None  # video and unknown syntaxes are never touched
    if configured == "uncompressed":
        return None if current == "uncompressed" else uid.ExplicitVRLittleEndian
    if configured == "lossless":
        return lossless_syntax if current == "uncompressed" else None
    return lossy_syntax if current in ("uncompressed", "lossless") else None


# What `uncompressed` means in a destination's `accepts` (rule 1 above).
SEND_UNCOMPRESSED: tuple[str, ...] = UNIVERSAL


def accepted_syntaxes(accepts: list[str] | tuple[str, ...]) -> list[str]:
    """A destination's `accepts` (classes, UIDs or keywords) as UIDs in its order of preference."""
    ordered: list[str] = []
    for entry in accepts:
        if entry == "uncompressed":
            group = list(SEND_UNCOMPRESSED)
        elif entry in ("lossless", "lossy"):
            group = list(members(entry))
        else:
            group = [resolve(entry) or entry]  # a UID, or pydicom's keyword for one
        ordered.extend(s for s in group if s not in ordered)
    return ordered


def send_candidates(stored: str, accepts: list[str] | tuple[str, ...]) -> list[str]:
    """Syntaxes to propose for an object stored in `stored`, best first (the rule above)."""
    current = class_of(stored)
    wanted = accepted_syntaxes(accepts)
    first = [stored] if stored in wanted else []
    candidates = first + [s for s in wanted if s != stored and _allowed(stored, current, s)]
    candidates += [s for s in UNIVERSAL if s not in candidates]
    return candidates


def _allowed(stored: str, current: str | None, target: str) -> bool:
    if target == stored:
        return True
    if target == uid.ExplicitVRBigEndian:
        return False  # never produced (see the module docstring)
    wanted = class_of(target)
    if current is None or wanted is None:
        return False  # video or unknown syntaxes: only as they are
    if current == "lossy":
        return wanted == "uncompressed"
    return True


__all__ = ["SEND_UNCOMPRESSED", "STORE_FORMATS", "accepted_syntaxes", "expand", "send_candidates",
           "store_target"]
