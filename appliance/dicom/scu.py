"""Sending archived objects to a destination in a syntax it accepts (the send rule).

For each object the association proposes the syntaxes the send rule allows
(`policy.send_candidates`: as stored when the destination takes it, then
its `accepts` in order, closed by Explicit and Implicit VR Little Endian,
which every DICOM node must take), one presentation context per syntax (an
acceptor picks from a context's list in its own order, not ours).
Once the destination has answered, each object is converted to the best
syntax it actually accepted, through the verified conversion
(`transcode.convert`); if that conversion is impossible (a codec cannot
hold the image) or refused (the source stream is corrupt, the result is
not the source), the next accepted one is tried. An object no accepted
syntax works for is not sent, and only that object: its result carries
the reasons. An object whose SOP class the destination accepted in none of
the proposed syntaxes (a private class, a lossy image for a lossless-only
viewer) is not sent either, and only that object: `not_accepted` says so,
so the forwarder retries it later (the destination may be reconfigured)
without calling the destination unreachable. pynetdicom never transcodes
by itself: this module is where it happens.

The forwarder drives `StoreSender` with its durable queue; the
sender itself knows nothing of queues or retries.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt

from appliance.transcode.convert import CannotConvert, ConversionRefused, Quality, convert
from appliance.transcode.errors import one_line
from appliance.transcode.policy import send_candidates
from appliance.transcode.syntaxes import UNIVERSAL, name_of

log = logging.getLogger("appliance.send")

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255
CANDIDATES_PER_CLASS = 6


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    accepts: tuple[str, ...] = ("uncompressed",)


@dataclass(frozen=True)
class SendResult:
    path: Path
    sop_instance_uid: str  # as sent (a lossy step makes a new one)
    transfer_syntax: str  # as sent
    status: int | None  # DIMSE status, None when the object could not be sent
    detail: str = ""
    # Conversions tried and refused by the check, (syntax, reason): the caller logs and counts them.
    refused: tuple[tuple[str, str], ...] = ()
    # No syntax the destination accepted can carry this object: sending again cannot help.
    unsendable: bool = False
    # The destination accepted no proposed context for this object's SOP class and syntaxes.
    not_accepted: bool = False
    sop_class: str = ""


def set_nodelay(event: evt.Event) -> None:
    """Nagle off on our requestor sockets too: a C-STORE waits ~40 ms for the delayed ACK otherwise."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def c_echo(calling_ae: str, destination: Destination, timeout: float = 10.0) -> str | None:
    """None when the destination answers C-ECHO with success, else what went wrong.

    A destination that associates but refuses the Verification context (a picky workstation
    configured for its image classes only) is up: it is as reachable as it will ever be.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            return None  # it answered and negotiated: it only does not take Verification
        if assoc.is_rejected:
            return "association rejected"
        return "association not established (refused, aborted or unreachable)"
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if status and "Status" in status else None
        return None if code == 0 else f"C-ECHO answered {code!r}"
    finally:
        assoc.release()


def _read(path: Path, stop_before_pixels: bool = False) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)


# An object sent as stored goes from its file in PDU-sized chunks, never decoded:
# no re-encoding, and the forwarder's memory does not grow with the object or the
# batch (177 -> 72 MB for 200 CT slices, docs/PERFORMANCE.md). A documented
# pynetdicom setting (pynetdicom._config), for this process only.
_config.STORE_SEND_CHUNKED_DATASET = True


class _ReportedPerObject(logging.Filter):
    """pynetdicom's own ERROR when a peer accepts no context: each object's result says it
    better (which object, which SOP class, what was proposed), and the forwarder logs that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "No accepted presentation contexts"


logging.getLogger("pynetdicom.acse").addFilter(_ReportedPerObject())


class StoreSender:
    """Sends a batch of files (a study, say) over one association."""

    def __init__(self, calling_ae: str, quality: Quality | None = None, timeout: float = 30.0,
                 min_psnr: float | None = None) -> None:
        self.calling_ae = calling_ae
        self.quality = quality or Quality()
        self.timeout = timeout
        self.min_psnr = min_psnr

    def plan(self, datasets: Sequence[Dataset], accepts: Sequence[str]) -> list[tuple[str, str]]:
        """(SOP class, syntax) contexts to propose, in preference order, at most 128.

        At most CANDIDATES_PER_CLASS syntaxes beyond the two universal ones per
        object, so a batch of many classes stays under the 128 contexts; the
        universal pair is always proposed, wherever the rule puts it.
        """
        contexts: list[tuple[str, str]] = []
        for ds in datasets:
            candidates = send_candidates(str(ds.file_meta.TransferSyntaxUID), accepts)
            others = [s for s in candidates if s not in UNIVERSAL][:CANDIDATES_PER_CLASS]
            for syntax in [s for s in candidates if s in UNIVERSAL or s in others]:
                pair = (str(ds.SOPClassUID), syntax)
                if pair not in contexts:
                    contexts.append(pair)
        if len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"{len(contexts)} presentation contexts needed; send in smaller batches")
        return contexts

    def send(self, paths: Sequence[Path], destination: Destination) -> list[SendResult]:
        unreadable: dict[int, str] = {}
        readable: list[tuple[int, Path, Dataset]] = []
        for n, path in enumerate(paths):  # one bad archive file must not hold up its batch
            try:
                readable.append((n, path, _read(path, stop_before_pixels=True)))  # enough to plan
            except Exception as exc:  # pydicom raises many types for a damaged file
                unreadable[n] = f"unreadable archive file {path}: {exc}"[:200]
        results: list[SendResult | None] = [None] * len(paths)
        for n, detail in unreadable.items():
            results[n] = SendResult(paths[n], "", "", None, detail)
        if not readable:
            return [r for r in results if r is not None]
        datasets = [ds for _n, _p, ds in readable]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class, syntax in self.plan(datasets, destination.accepts):
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # Associated, then aborted by pynetdicom because nothing was accepted: a refusal of
            # these objects, not of the connection.
            for n, path, ds in readable:
                results[n] = self._not_accepted(path, ds, destination)
            return [r for r in results if r is not None]
        if not assoc.is_established:
            raise ConnectionError(
                f"association with {destination.ae_title}@{destination.host}:{destination.port} "
                "was not established (rejected, aborted or unreachable)"
            )
        try:
            for n, path, ds in readable:
                results[n] = self._send_one(assoc, path, ds, destination)
            return [r for r in results if r is not None]
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_one(self, assoc, path: Path, ds: Dataset, destination: Destination) -> SendResult:
        stored = str(ds.file_meta.TransferSyntaxUID)
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == ds.SOPClassUID}
        reasons: list[str] = []
        refused: list[tuple[str, str]] = []
        whole: Dataset | None = None
        if not accepted.intersection(send_candidates(stored, destination.accepts)):
            return self._not_accepted(path, ds, destination)
        for syntax in send_candidates(stored, destination.accepts):
            if syntax not in accepted:
                continue
            if syntax == stored:  # as stored: straight from the file, never decoded
                status = assoc.send_c_store(path)
                code = int(status.Status) if status and "Status" in status else None
                return SendResult(path, str(ds.SOPInstanceUID), syntax, code,
                                  "" if code is not None else "no response (association lost)",
                                  tuple(refused), sop_class=str(ds.SOPClassUID))
            if whole is None:
                try:
                    whole = _read(path)
                except Exception as exc:  # pixel data damaged past the header
                    return SendResult(path, str(ds.SOPInstanceUID), stored, None,
                                      f"unreadable archive file {path}: {one_line(exc)}"[:200])
            try:
                bound = {} if self.min_psnr is None else {"min_psnr": self.min_psnr}
                outgoing = convert(whole, syntax, self.quality, **bound).dataset
            except ConversionRefused as exc:
                refused.append((syntax, one_line(exc)))
                reasons.append(f"{name_of(syntax)}: {one_line(exc)}")
                continue
            except CannotConvert as exc:
                reasons.append(f"{name_of(syntax)}: {one_line(exc)}")
                continue
            status = assoc.send_c_store(outgoing)
            code = int(status.Status) if status and "Status" in status else None
            log.info("%s sent to %s as %s (stored as %s)", ds.SOPInstanceUID, destination.ae_title,
                     name_of(syntax), name_of(stored))
            return SendResult(path, str(outgoing.SOPInstanceUID), syntax, code,
                              "" if code is not None else "no response (association lost)", tuple(refused),
                              sop_class=str(ds.SOPClassUID))
        detail = "; ".join(reasons) or (
            f"{destination.ae_title} accepted no syntax this object can be sent in "
            f"(offered {', '.join(name_of(s) for s in send_candidates(stored, destination.accepts))})"
        )
        return SendResult(path, str(ds.SOPInstanceUID), stored, None, detail, tuple(refused), unsendable=True)

    def _not_accepted(self, path: Path, ds: Dataset, destination: Destination) -> SendResult:
        """The destination took none of the contexts proposed for this object."""
        proposed = ", ".join(name_of(s) for s in send_candidates(str(ds.file_meta.TransferSyntaxUID),
                                                                  destination.accepts))
        sop_class = str(ds.SOPClassUID)
        label = name_of(sop_class)
        detail = (f"no presentation context accepted for SOP class {label}"
                  f"{'' if label == sop_class else f' ({sop_class})'}; proposed {proposed}")
        return SendResult(path, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), None,
                          detail, not_accepted=True, sop_class=sop_class)
