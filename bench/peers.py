"""Real DICOM peers for benchmarks: DCMTK storescp, Orthanc and the appliance.

Each peer is started as its own process on a free loopback port with its
data in a fresh directory, answers `ready()` only once it really accepts
associations, reports how many instances it holds (from its own storage or
API, not from the sender's word), and reports its process's peak RSS and CPU
time, read from /proc before it is stopped (see machine.py).

Every process runs with TCP_NODELAY=1 in its environment: Debian's DCMTK and
Orthanc leave Nagle on otherwise, and each C-STORE then stalls ~40 ms
on loopback, which would measure the kernel's timer rather than the peer.

Later benchmarks (forwarding, transcoding, disk copy) reuse these classes and
`storescu()`; nothing here knows about the receive benchmark.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import cpu_seconds, proc_status_kb

REPO = Path(__file__).resolve().parent.parent
ORTHANC_BINARY = "/usr/sbin/Orthanc"


class PeerError(RuntimeError):
    """A peer did not start, did not store what it was sent, or did not stop."""


def dcmtk(tool: str) -> str:
    """The absolute path of a DCMTK tool, never pynetdicom's namesake in the venv.

    pynetdicom installs `storescu`, `echoscu`, `storescp` ... into the venv's
    bin directory with other options; with the venv activated, PATH would
    pick those and measure pynetdicom instead of DCMTK.
    """
    venv_bin = Path(sys.prefix, "bin").resolve()
    search = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    found = shutil.which(tool, path=os.pathsep.join(["/usr/bin", *search]))
    if found is None:
        raise PeerError(f"DCMTK {tool} not found; install the Debian package dcmtk (make deps)")
    return found


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nodelay_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus TCP_NODELAY=1, for every DCMTK tool and Orthanc."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


# --- sending ------------------------------------------------------------------


@dataclass
class SendResult:
    """One storescu run: how long it took and what it said."""

    seconds: float
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float


def storescu(
    port: int,
    files: list[Path],
    *,
    called_aet: str,
    calling_aet: str = "BENCHSCU",
    options: tuple[str, ...] = (),
    timeout: float = 1800.0,
) -> SendResult:
    """Send `files` with DCMTK storescu over one association; time it with the wall clock.

    The clock runs from just before the process starts to its exit, so it
    includes storescu reading the files and the association set-up and
    release: a constant few tens of milliseconds that every peer pays alike.
    `cpu_seconds` is storescu's own CPU time (the only child reaped meanwhile).
    """
    command = [dcmtk("storescu"), "-aet", calling_aet, "-aec", called_aet, *options, "127.0.0.1", str(port),
               *map(str, files)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env=nodelay_env(), capture_output=True, text=True,
                            timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return SendResult(seconds, result.returncode, result.stdout, result.stderr, cpu)


def echo(port: int, called_aet: str, timeout: float = 10.0) -> bool:
    """True if the peer answers a C-ECHO."""
    try:
        result = subprocess.run(
            [dcmtk("echoscu"), "-aet", "BENCHPROBE", "-aec", called_aet, "-to", "5", "127.0.0.1", str(port)],
            env=nodelay_env(), capture_output=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


# --- peers --------------------------------------------------------------------


@dataclass(kw_only=True)
class Peer:
    """A receiving DICOM peer in its own process and directory.

    Subclasses say how to start it (`command`), when it is ready, and how
    many instances it holds. `workdir` is created empty and is the peer's
    alone; it is removed by `cleanup()`.
    """

    name: str = "peer"
    workdir: Path
    aet: str = "PEER"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    start_timeout: float = 30.0

    def __post_init__(self) -> None:
        # The process runs in its workdir: paths handed to it must not be relative.
        self.workdir = self.workdir.resolve()

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return nodelay_env()

    def prepare(self) -> None:
        """Write configuration files before the process starts."""

    def ready(self) -> bool:
        return echo(self.port, self.aet)

    def stored_count(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        self.prepare()
        command = self.command()
        with open(self.log_path, "ab") as log:
            try:
                self.process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir
                )
            except OSError as exc:
                raise PeerError(f"cannot start {self.name} ({command[0]}): {exc}") from None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerError(f"{self.name} exited with code {self.process.returncode} at start:\n"
                                f"{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise PeerError(f"{self.name} did not become ready in {self.start_timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        if self.process is None:
            raise PeerError(f"{self.name} is not running")
        return self.process.pid

    def peak_rss_bytes(self) -> int | None:
        """Peak resident memory of the peer process so far (VmHWM), before it stops."""
        kb = proc_status_kb(self.pid, "VmHWM")
        return kb * 1024 if kb is not None else None

    def rss_bytes(self) -> int | None:
        """Resident memory of the peer process now (VmRSS)."""
        kb = proc_status_kb(self.pid, "VmRSS")
        return kb * 1024 if kb is not None else None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait; SIGKILL (and say so) if the peer ignores it."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise PeerError(f"{self.name} ignored SIGTERM for {timeout} s; killed") from None
        return self.process.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@dataclass(kw_only=True)
class StoreSCP(Peer):
    """DCMTK storescp with its defaults: one process, files written as received, no fsync."""

    name: str = "storescp"
    aet: str = "STORESCP"
    options: tuple[str, ...] = ()

    @property
    def output_dir(self) -> Path:
        return self.workdir / "received"

    def prepare(self) -> None:
        self.output_dir.mkdir()

    def command(self) -> list[str]:
        return [dcmtk("storescp"), "-aet", self.aet, *self.options, "-od", str(self.output_dir),
                str(self.port)]

    def stored_count(self) -> int:
        return sum(1 for entry in self.output_dir.iterdir() if entry.is_file())


@dataclass(kw_only=True)
class Orthanc(Peer):
    """Orthanc with SQLite index and file storage in its workdir, DICOM and REST on loopback.

    `sync_storage` is Orthanc's SyncStorageArea (fsync of each stored file;
    true by default since Orthanc 1.7.4). `settings` adds or overrides keys of
    the JSON configuration.
    """

    name: str = "orthanc"
    aet: str = "ORTHANC"
    http_port: int = field(default_factory=free_port)
    sync_storage: bool = True
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    def configuration(self) -> dict[str, Any]:
        return {
            "Name": f"bench-{self.name}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SyncStorageArea": self.sync_storage,
            "Plugins": [],
            **self.settings,
        }

    def prepare(self) -> None:
        self.config_path.write_text(json.dumps(self.configuration(), indent=2), encoding="utf-8")

    def command(self) -> list[str]:
        return [ORTHANC_BINARY, str(self.config_path)]

    def rest(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            self.rest("/system")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return echo(self.port, self.aet)

    def stored_count(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])

    def version(self) -> str:
        return str(self.rest("/system").get("Version", "?"))


@dataclass(kw_only=True)
class Appliance(Peer):
    """`python -m appliance dicom` with its own TOML configuration and data_dir.

    `node` adds or overrides keys of the [node] section.
    """

    name: str = "appliance"
    aet: str = "GATEWAY"
    node: dict[str, Any] = field(default_factory=dict)
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def config_path(self) -> Path:
        return self.workdir / "appliance.toml"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def configuration(self) -> dict[str, Any]:
        return {
            "ae_title": self.aet,
            "dicom_port": self.port,
            "bind_address": "127.0.0.1",
            "data_dir": str(self.data_dir),
            "min_free_mb": 100,
            **self.node,
        }

    def prepare(self) -> None:
        lines = ["[node]"]
        for key, value in self.configuration().items():
            lines.append(f"{key} = {_toml(value)}")
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self) -> list[str]:
        return [self.python, "-m", "appliance", "--config", str(self.config_path), "dicom"]

    def env(self) -> dict[str, str]:
        # Run the working tree's code even if the venv holds another install.
        path = os.environ.get("PYTHONPATH")
        return nodelay_env({"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)})

    def cli(self, *args: str, timeout: float = 300.0) -> str:
        """Run an `appliance` field-engineer command on this peer's configuration."""
        result = subprocess.run(
            [self.python, "-m", "appliance", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, env=self.env(), cwd=REPO, check=False,
        )
        if result.returncode != 0:
            raise PeerError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result.stdout

    def find(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.cli("find", "--json").splitlines() if line.strip()]

    def stored_count(self) -> int:
        return len(self.find())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


# --- versions -----------------------------------------------------------------


def tool_version(command: list[str]) -> str:
    """First non-empty output line of a `--version` call, or 'unavailable'."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "unavailable"
    for line in (result.stdout + result.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unavailable"
