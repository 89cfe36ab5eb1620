"""Shared fixtures: the real appliance service, real DCMTK peers, on loopback.

`appliance` starts `python -m appliance dicom` as a child process with its own
configuration file and data_dir, waits until it answers C-ECHO, and stops it
with SIGTERM afterwards (checking it exits cleanly). DCMTK tools run with
TCP_NODELAY=1 (Debian's DCMTK leaves Nagle on otherwise: ~40 ms per C-STORE,
~20 images/s whatever the size).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parent.parent
TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
CHARSET_FILES = TEST_FILES.parent / "charset_files"


# Debian's DCMTK, by absolute path: the venv's bin/ holds pynetdicom's own
# storescu/echoscu scripts, which would shadow them on an activated PATH.
DCMTK = Path("/usr/bin")
ECHOSCU, STORESCU, STORESCP = (str(DCMTK / tool) for tool in ("echoscu", "storescu", "storescp"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", every: float = 0.1):
    """Poll `predicate` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def write_config(path: Path, node: dict[str, object], web_port: int | None = None) -> Path:
    """A [node] section from `node`; the status page off unless `web_port` is given
    (tests run many gateways at once, and `appliance status` counts a stopped page)."""
    lines = ["[web]", f"port = {web_port}\nbind_address = \"127.0.0.1\"" if web_port else "enabled = false",
             "[node]"]
    for key, value in node.items():
        if isinstance(value, str | Path):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, list | tuple):
            lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(
    config: Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"appliance {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def find_json(config: Path, *args: str) -> list[dict]:
    out = run_cli(config, "find", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def echo(port: int, aet: str = "ECHOSCU", aec: str = "GATEWAY", timeout: float = 10) -> int:
    return subprocess.run(
        [ECHOSCU, "-aet", aet, "-aec", aec, "-to", "5", "127.0.0.1", str(port)],
        env=dcmtk_env(), capture_output=True, timeout=timeout,
    ).returncode


def storescu(port: int, files: list[Path], *options: str, aet: str = "STORESCU",
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Send `files` over one association; options e.g. ('-xv',) pick the proposal."""
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", "GATEWAY", "-v", *options, "127.0.0.1", str(port),
         *[str(f) for f in files]],
        env=dcmtk_env(), capture_output=True, text=True, timeout=timeout,
    )


@dataclass
class ApplianceProcess:
    """A running `appliance dicom` with its configuration and data directory."""

    config: Path
    data_dir: Path
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    node: dict[str, object] = field(default_factory=dict)

    def start(self, wait: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(self.config), "dicom"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"appliance dicom exited {self.process.returncode}:\n{self.log()}")
            if echo(self.port, aet="PROBE") == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"appliance dicom did not answer C-ECHO in {wait} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"appliance dicom ignored SIGTERM for {timeout} s:\n{self.log()}") from None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def find(self, *args: str) -> list[dict]:
        return find_json(self.config, *args)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli(self.config, *args, check=check)


@pytest.fixture
def make_appliance(tmp_path: Path) -> Iterator:
    """Factory: make_appliance(data_dir=..., **node settings) -> started ApplianceProcess."""
    started: list[ApplianceProcess] = []

    def factory(data_dir: Path | None = None, start: bool = True, **node: object) -> ApplianceProcess:
        port = free_port()
        data_dir = data_dir or tmp_path / f"data{len(started)}"
        settings = {"dicom_port": port, "data_dir": str(data_dir), "min_free_mb": 1,
                    "bind_address": "127.0.0.1", **node}
        config = write_config(tmp_path / f"appliance{len(started)}.toml", settings)
        proc = ApplianceProcess(config, data_dir, port, tmp_path / f"appliance{len(started)}.log",
                                node=settings)
        started.append(proc)
        if start:
            proc.start()
        return proc

    yield factory
    for proc in started:
        if proc.process is not None and proc.process.poll() is None:
            code = proc.stop()
            assert code == 0, f"appliance dicom exited {code} on SIGTERM:\n{proc.log()}"


@pytest.fixture
def appliance(make_appliance) -> ApplianceProcess:
    return make_appliance()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, after its file meta information."""
    with open(path, "rb") as fp:
        pydicom.filereader.read_preamble(fp, force=False)
        pydicom.filereader._read_file_meta_info(fp)
        return fp.read()


def synthetic_ct(directory: Path, count: int, size: int = 128, patient_id: str = "SYN001") -> list[Path]:
    """`count` distinct CT images of one series (16-bit, `size`², Explicit VR LE)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(count)
    paths = []
    for n in range(count):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = patient_id, "Test^Synthetic"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20261123", "CT", 1, n + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        path = directory / f"ct{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _quiet_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


@pytest.fixture
def loop_disks(tmp_path: Path) -> Iterator:
    """loop_disks(name, mb, label="") -> mount point of a fresh ext4 file system on a loop device.

    The real thing for "disk full", "USB disk unplugged" (umount -l) and "blank
    replacement disk". Needs root and loop devices, as `make test` documents: without
    them the test fails saying so (a developer may deselect them: -m 'not root').
    Everything is unmounted and detached at the end, lazily if still busy.
    """
    made: list[tuple[Path, Path]] = []

    def make(name: str, mb: int = 40, label: str = "") -> Path:
        assert os.geteuid() == 0, "loop-mounting an ext4 image needs root: run make test as root"
        assert shutil.which("mkfs.ext4"), "mkfs.ext4 is missing: make test installs e2fsprogs"
        image = tmp_path / f"{name}.img"
        mount = tmp_path / f"mnt-{name}"
        mount.mkdir()
        with open(image, "wb") as fp:
            fp.truncate(mb * 1024 * 1024)
        # -m 0: the tests run as root, and root may use the reserved blocks.
        labelled = ("-L", label) if label else ()
        created = _quiet_run("mkfs.ext4", "-q", "-m", "0", "-F", *labelled, str(image))
        assert created.returncode == 0, created.stderr
        mounted = _quiet_run("mount", "-o", "loop", str(image), str(mount))
        if mounted.returncode != 0:
            _quiet_run("modprobe", "loop")
            mounted = _quiet_run("mount", "-o", "loop", str(image), str(mount))
        assert mounted.returncode == 0, f"cannot loop-mount an ext4 image: {mounted.stderr.strip()}"
        made.append((image, mount))
        return mount

    yield make
    for image, mount in made:
        if _quiet_run("umount", str(mount)).returncode != 0:
            _quiet_run("umount", "-l", str(mount))
        for line in _quiet_run("losetup", "-j", str(image)).stdout.splitlines():
            device = line.split(":", 1)[0]
            if device.startswith("/dev/loop"):
                _quiet_run("losetup", "-d", device)
