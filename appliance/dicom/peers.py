"""[[peer]]: which calling AEs may associate, from where, and for which services.

With no [[peer]] entry the door is as open as [node] allowed_callers says
(empty: anyone). With at least one, a calling AE title that matches no entry
(or matches one whose `address` does not hold the connection's address) is
rejected at association time, and a known peer gets only the presentation
contexts of the services its entry lists; Verification (C-ECHO) is always
allowed to a known peer, so a field engineer can test the link before any
service is granted.

Service names are the ones a clinic's network plan uses. `store` and
`commitment` (Storage Commitment Push Model) are served today; `query`,
`retrieve` and `worklist` are accepted names for the services to come, so a
configuration written now keeps its meaning when they arrive.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from appliance.fields import check_ae_title

SERVICES = ("store", "query", "retrieve", "worklist", "commitment")
SERVED = ("store", "commitment")  # the services the acceptor implements today

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
WORKLIST_ROOT = "1.2.840.10008.5.1.4.31"
QUERY_RETRIEVE_ROOT = "1.2.840.10008.5.1.4.1.2."


def check_address(value: str) -> str | None:
    if not value:
        return None
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return 'an IP address ("192.168.1.20", "::1") or a network in CIDR ("192.168.1.0/24")'
    return None


def check_services(value: tuple[str, ...]) -> str | None:
    for name in value:
        if name not in SERVICES:
            return f"{name!r} is not a service; allowed: {', '.join(SERVICES)} (echo is always allowed)"
    return None


@dataclass(frozen=True)
class PeerSettings:
    """[[peer]]: a modality or workstation allowed to associate with the gateway."""

    ae_title: str = field(metadata={"check": check_ae_title, "doc": "its calling AE title (exact)"})
    address: str = field(default="", metadata={
        "check": check_address,
        "doc": 'its IP address or network ("192.168.1.0/24"); empty = from anywhere'})
    services: tuple[str, ...] = field(default=("store",), metadata={
        "check": check_services,
        "doc": "store, query, retrieve, worklist, commitment (echo is always allowed)"})
    port: int = field(default=0, metadata={
        "check": lambda v: None if 0 <= v <= 65535 else "a TCP port, 1-65535 (0: none)",
        "doc": "its DICOM port, where a Storage Commitment report goes when its association has "
               "closed (address must then be one IP); 0 = none"})

    def holds(self, address: str) -> bool:
        """True when the connection's IP address lies in this entry's address or network."""
        if not self.address:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        network = ipaddress.ip_network(self.address, strict=False)
        return ip.version == network.version and ip in network


def match(peers: tuple[PeerSettings, ...], calling_ae: str, address: str) -> PeerSettings | None:
    """The entry admitting `calling_ae` from `address`, or None."""
    for peer in peers:
        if peer.ae_title == calling_ae and peer.holds(address):
            return peer
    return None


def refusal(peers: tuple[PeerSettings, ...], calling_ae: str, address: str) -> str:
    """Why no entry matched, with the setting that would let the caller in."""
    known = [p for p in peers if p.ae_title == calling_ae]
    if known:
        where = ", ".join(p.address for p in known)
        return (f"calling AE title not recognised from {address}: its [[peer]] entry allows only {where}; "
                "change that entry's address to let it in")
    return ("calling AE title not recognised: no [[peer]] entry has this ae_title; add a [[peer]] "
            "(ae_title, address, services) to let it in")


def service_of(abstract_syntax: str) -> str | None:
    """The [[peer]] service a presentation context belongs to; None for Verification (always allowed).

    Anything that is not Verification, commitment, worklist or query/retrieve
    is storage here: negotiation.choose() has already refused what is not.
    """
    if abstract_syntax == VERIFICATION:
        return None
    if abstract_syntax == STORAGE_COMMITMENT_PUSH:
        return "commitment"
    if abstract_syntax.startswith(WORKLIST_ROOT):
        return "worklist"
    if abstract_syntax.startswith(QUERY_RETRIEVE_ROOT):
        return "query" if abstract_syntax.endswith(".1") else "retrieve"
    return "store"


def allows(peer: PeerSettings | None, abstract_syntax: str) -> bool:
    """True when `peer` (None: no [[peer]] configured) may use this presentation context."""
    if peer is None:
        return True
    service = service_of(abstract_syntax)
    return service is None or service in peer.services
