"""DCMTK storescp peers that accept exactly one transfer syntax, as a picky PACS does.

storescp's +x options only change which syntax it prefers; an association
negotiation profile (-xf) restricts it to one. Each peer writes what it
receives bit for bit (+B) into its own folder, one per target syntax.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.conftest import STORESCP, dcmtk_env, free_port, wait_for
from tests.conversion_inputs import MF_BIT_SC, MF_BYTE_SC, MF_COLOUR_SC, MF_WORD_SC, RT_DOSE, SC

SOP_CLASSES = (SC, MF_BIT_SC, MF_BYTE_SC, MF_COLOUR_SC, MF_WORD_SC, RT_DOSE)


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on the port (C-ECHO would need a
    context in Implicit VR, which these peers refuse on purpose)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def profile(syntax: str) -> str:
    """An association configuration for storescp -xf: these SOP classes in `syntax` only."""
    contexts = "\n".join(f"PresentationContext{n} = {sop}\\Only" for n, sop in enumerate(SOP_CLASSES, 1))
    return (f"[[TransferSyntaxes]]\n[Only]\nTransferSyntax1 = {syntax}\n\n"
            f"[[PresentationContexts]]\n[Matrix]\n{contexts}\n\n"
            "[[Profiles]]\n[Matrix]\nPresentationContexts = Matrix\n")


class OneSyntaxPeers:
    """One storescp per syntax, started when first asked for, stopped together."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: dict[str, tuple[int, Path, subprocess.Popen]] = {}

    def peer(self, syntax: str) -> tuple[int, Path]:
        """(port, folder it writes to) of the storescp that takes only `syntax`."""
        if syntax not in self.started:
            config = self.directory / f"{syntax}.cfg"
            config.write_text(profile(syntax), encoding="ascii")
            received = self.directory / syntax
            received.mkdir()
            port = free_port()
            process = subprocess.Popen(
                [STORESCP, "-aet", "STORESCP", "-xf", str(config), "Matrix", "+B", "-od", str(received),
                 str(port)],
                env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.started[syntax] = (port, received, process)
            wait_for(lambda: process.poll() is not None or _listening(port),
                     timeout=10, what=f"storescp for {syntax}")
            assert process.poll() is None, f"storescp for {syntax} exited {process.returncode}"
        port, received, _ = self.started[syntax]
        return port, received

    def stop(self) -> None:
        for _port, _received, process in self.started.values():
            process.terminate()
            process.wait(timeout=10)
