"""Forwarding throughput and latency: storescu -> appliance -> Orthanc, against storescu -> Orthanc.

    .venv/bin/python bench/forward.py              # 1,000 images, 3 rounds (part of `make bench`)
    .venv/bin/python bench/forward.py --quick      # 100 images, one round: a smoke test

The gateway's promise is that what a modality sends reaches the PACS; a
clinic feels how long that takes. So the same synthetic CT files (512x512,
16-bit, Explicit VR Little Endian) go, in each round:

    direct   DCMTK storescu -> a fresh Orthanc, over one association: the
             rate a modality would get without the gateway (the baseline);
    forward  storescu -> `appliance dicom` while `appliance forward` sends
             on to a fresh Orthanc ([[destination]], accepts ["uncompressed"]):
             end-to-end rate = images / (storescu's start -> the last image
             stored at Orthanc), and per image the latency from the
             appliance's ack to its arrival at Orthanc;
    drain    the same images already in the appliance (received with the
             forwarder stopped), then `appliance forward` started: the
             forwarder's own rate with nothing else on the CPUs, i.e. how
             fast a backlog empties after a PACS outage.
    single   --single images (20), each on its own storescu association once
             the previous one arrived, after a random 0-0.5 s pause: the
             latency a modality sending now and then sees at an idle gateway
             (the burst's latency is mostly queueing).

The ratio printed is forward end-to-end images/s / direct images/s.

How times are taken, and why:
- **ack at the appliance**: storescu logs through a log4cplus configuration
  with millisecond timestamps (`-lc`), so each "Received Store Response"
  line is the moment the sender got the appliance's answer, i.e. after the
  appliance stored and indexed the image (the durability rule). The i-th
  response belongs to the i-th file: storescu sends one at a time.
- **arrival at Orthanc**: Orthanc's own stamps (ReceptionDate metadata, the
  /changes "Date") have whole-second resolution, too coarse for a latency.
  A thread polls `/changes` every POLL_SECONDS over one keep-alive HTTP
  connection; a NewInstance change first seen by a poll happened between
  the previous complete poll's request and this poll's response, and is
  stamped with the middle of that window (the window's width is reported:
  the resolution). Orthanc logs the change in the transaction that indexes
  the instance, before it answers the C-STORE. Orthanc's instance IDs are
  SHA-1 of PatientID|StudyUID|SeriesUID|SOPInstanceUID, so each change maps
  to a file without any further REST call. The same poller runs in the
  direct runs, so Orthanc bears the same load in both.
- Every process runs with TCP_NODELAY=1 (bench/peers.py), and the machine
  may be shared: each timed run waits for idle CPUs first and is measured
  again when other processes took more than DISTURBED_CPUS during it (as in
  bench/receive.py).

Checks (a failed one fails the run): storescu exits 0 with a Success
response for every file; Orthanc holds every image (/statistics and one
NewInstance change per expected ID, none unexpected); every forward job of
the appliance is done; both appliance services exit 0 on SIGTERM.
Results: a table on stdout, everything in bench/results/forward.json;
docs/PERFORMANCE.md ("Forwarding") says what they mean.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import machine
import peers
import pydicom
import synthetic
from receive import appliance_revision, filesystem, machine_description, versions, warm_page_cache

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# Poll period of Orthanc's /changes: 50 small REST calls a second cost Orthanc
# well under 1 % of a core, and give arrival times to about +-15 ms.
POLL_SECONDS = 0.02
# A run during which other processes kept more CPUs busy than this measured the
# neighbours as much as the gateway: it is repeated and not counted (as in receive.py).
DISTURBED_CPUS = 0.15
KINDS = ("direct", "forward", "drain", "single")
# storescu's log with the wall clock to the millisecond: the ack times.
ACK_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%Y-%m-%dT%H:%M:%S.%q} %m%n
"""
ACK_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) "
                      r"(?:Sending file: (\S+)|Received Store Response \(([^)\n]*)\))")


# --- the images -----------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """One input file and the names it has at each end."""

    path: Path
    sop_instance_uid: str
    orthanc_id: str


def orthanc_id(patient_id: str, study: str, series: str, sop_instance: str) -> str:
    """Orthanc's public ID of an instance: SHA-1 of the four keys, in five dashed groups.

    Knowing it up front lets the /changes poller name each arrival without a
    REST call per image (which would load Orthanc during the measurement).
    """
    digest = hashlib.sha1("|".join((patient_id, study, series, sop_instance)).encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def read_images(files: list[Path]) -> list[Image]:
    """Header of every file, read once before any timing."""
    images = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        images.append(Image(path, str(ds.SOPInstanceUID),
                            orthanc_id(str(ds.PatientID), str(ds.StudyInstanceUID),
                                       str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))))
    return images


# --- the peers ------------------------------------------------------------------


@dataclass(kw_only=True)
class Gateway(peers.Appliance):
    """`appliance dicom` whose configuration also names one destination and the [forward] settings."""

    destination: dict[str, Any] = field(default_factory=dict)
    forward: dict[str, Any] = field(default_factory=dict)

    def prepare(self) -> None:
        super().prepare()
        # JSON strings, numbers, booleans and arrays of strings are valid TOML values.
        lines = ["", "[forward]", *(f"{k} = {json.dumps(v)}" for k, v in self.forward.items()),
                 "", "[[destination]]", *(f"{k} = {json.dumps(v)}" for k, v in self.destination.items())]
        with open(self.config_path, "a", encoding="utf-8") as fp:
            fp.write("\n".join(lines) + "\n")

    def index_path(self) -> Path:
        return self.data_dir / "index.sqlite"

    def job_states(self) -> dict[str, int]:
        """Forward jobs by state, from `appliance queue --json` (the field engineer's view)."""
        counts: dict[str, int] = {}
        for line in self.cli("queue", "--json").splitlines():
            if line.strip():
                state = json.loads(line)["state"]
                counts[state] = counts.get(state, 0) + 1
        return counts

    def associations(self) -> int | None:
        """Associations the forwarder opened to the destination (destination_state.connects)."""
        try:
            with sqlite3.connect(f"file:{self.index_path()}?mode=ro", uri=True, timeout=10) as conn:
                row = conn.execute("SELECT connects FROM destination_state WHERE name = ?",
                                   (self.destination["name"],)).fetchone()
        except sqlite3.Error:
            return None
        return int(row[0]) if row else None


@dataclass
class ForwardService:
    """`appliance forward` on a Gateway's configuration, started as tests/test_forward.py does."""

    gateway: Gateway
    process: subprocess.Popen[bytes] | None = None
    ready_at: float = 0.0  # time.time() when its state file first said "running"

    @property
    def log_path(self) -> Path:
        return self.gateway.workdir / "forward.log"

    @property
    def state_file(self) -> Path:
        return self.gateway.data_dir / "run" / "forward.json"

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it runs: its workers are started just before that."""
        command = [self.gateway.python, "-m", "appliance", "--config", str(self.gateway.config_path),
                   "forward"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.gateway.env(), cwd=peers.REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise peers.PeerError(f"appliance forward exited {self.process.returncode} at start:\n"
                                      f"{self.log_tail()}")
            try:
                state = json.loads(self.state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = {}
            if state.get("pid") == self.process.pid and state.get("status") == "running":
                self.ready_at = time.time()
                return
            time.sleep(0.01)
        self.stop()
        raise peers.PeerError(f"appliance forward was not running after {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        if self.process is None:
            raise peers.PeerError("appliance forward is not running")
        return self.process.pid

    def cpu_seconds(self) -> float | None:
        return machine.cpu_seconds(self.pid)

    def peak_rss_bytes(self) -> int | None:
        kb = machine.proc_status_kb(self.pid, "VmHWM")
        return kb * 1024 if kb is not None else None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait: the service must finish its batch and exit 0."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise peers.PeerError(f"appliance forward ignored SIGTERM for {timeout} s; killed") from None
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- arrival at Orthanc -------------------------------------------------------------


class ArrivalWatcher(threading.Thread):
    """Polls Orthanc's /changes and stamps each new instance with this machine's wall clock.

    Orthanc's own stamps are whole seconds; see the module docstring for why
    the middle of the poll window is the arrival time.
    """

    def __init__(self, orthanc: peers.Orthanc, expected: set[str], interval: float = POLL_SECONDS) -> None:
        super().__init__(name="arrival-watcher", daemon=True)
        self.orthanc = orthanc
        self.expected = expected
        self.interval = interval
        self.arrivals: dict[str, float] = {}
        self.windows: list[float] = []  # width of the window each arrival lies in, seconds
        self.unexpected: list[str] = []
        self.polls = 0
        self.error = ""
        self.all_arrived = threading.Event()
        self.stopping = threading.Event()

    def _get(self, conn: http.client.HTTPConnection, path: str) -> Any:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"GET {path}: HTTP {response.status}")
        return json.loads(body)

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.orthanc.http_port, timeout=10)
        since = 0
        window_start = time.time()  # nothing can have arrived before the watcher started
        try:
            while not self.stopping.is_set():
                sent = time.time()
                try:
                    page = self._get(conn, f"/changes?since={since}&limit=1000")
                except (http.client.HTTPException, ConnectionError):
                    conn.close()  # Orthanc closed the keep-alive connection: reconnect once
                    page = self._get(conn, f"/changes?since={since}&limit=1000")
                answered = time.time()
                self.polls += 1
                stamp = (window_start + answered) / 2
                for change in page["Changes"]:
                    if change["ChangeType"] != "NewInstance":
                        continue
                    if change["ID"] in self.expected and change["ID"] not in self.arrivals:
                        self.arrivals[change["ID"]] = stamp
                        self.windows.append(answered - window_start)
                    else:
                        self.unexpected.append(change["ID"])
                since = page["Last"]
                if len(self.arrivals) == len(self.expected):
                    self.all_arrived.set()
                    return
                if page["Done"]:  # a complete scan: later changes happened after this request
                    window_start = sent
                    self.stopping.wait(max(0.0, self.interval - (time.time() - sent)))
        except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
            self.error = f"polling Orthanc's /changes failed: {exc!r}"
        finally:
            conn.close()

    def wait(self, timeout: float) -> bool:
        """True when every expected instance arrived within `timeout` seconds."""
        arrived = self.all_arrived.wait(timeout)
        self.stopping.set()
        self.join(10)
        return arrived


# --- one measurement ----------------------------------------------------------------


@dataclass
class Run:
    """One timed pass of the images along one path."""

    kind: str
    round: int
    images: int
    arrived: int
    seconds: float  # direct: storescu; forward: storescu start -> last arrival; drain: ready -> last arrival
    images_per_second: float
    sender_seconds: float | None  # storescu's own time (forward: how fast the appliance took them in)
    latency_ms: dict[str, float] = field(default_factory=dict)
    arrival_window_ms: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float | None] = field(default_factory=dict)
    other_cpu_seconds: float | None = None
    kernel_threads_cpu_seconds: float | None = None
    forwarder_peak_rss_bytes: int | None = None
    associations: int | None = None
    polls: int = 0
    waited_for_quiet_seconds: float = 0.0
    ok: bool = True
    problem: str = ""
    disturbed: bool = False
    revision: str = ""
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def busy_cpus_during(self) -> float:
        """CPUs kept busy by other processes during the timed window, on average."""
        return (self.other_cpu_seconds or 0.0) / self.seconds if self.seconds > 0 else 0.0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": round(percentile(values, 50), 1), "p95": round(percentile(values, 95), 1),
            "max": round(max(values), 1), "min": round(min(values), 1),
            "mean": round(statistics.fmean(values), 1)}


def ack_times(stdout: str, images: list[Image]) -> tuple[dict[str, float], str]:
    """SOP Instance UID -> wall-clock time storescu got its response; and a problem, if any."""
    acks: dict[str, float] = {}
    by_path = {str(image.path): image for image in images}
    current: Image | None = None
    for match in ACK_LINE.finditer(stdout):
        stamp, path, status = match.groups()
        if path is not None:
            current = by_path.get(path)
        elif current is not None:
            if status != "Success":
                return acks, f"{current.path.name} answered {status}"
            acks[current.sop_instance_uid] = dt.datetime.fromisoformat(stamp).timestamp()
            current = None
    if len(acks) != len(images):
        return acks, f"storescu logged {len(acks)} successful responses for {len(images)} files"
    return acks, ""


class Measurement:
    """The peers of one run, started fresh, and what is read from them before they stop."""

    def __init__(self, kind: str, round_: int, images: list[Image], workdir: Path, args: argparse.Namespace):
        self.kind = kind
        self.round = round_
        self.images = images
        self.files = [image.path for image in images]
        self.args = args
        self.workdir = workdir / f"{kind}-{round_}"
        self.orthanc = peers.Orthanc(workdir=self.workdir / "orthanc")
        self.gateway: Gateway | None = None
        self.forwarder: ForwardService | None = None
        self.problems: list[str] = []
        self.single_storescu_cpu = 0.0
        if kind != "direct":
            self.gateway = Gateway(
                workdir=self.workdir / "appliance",
                forward={"batch_size": args.batch_size},
                destination={"name": "pacs", "ae_title": self.orthanc.aet, "host": "127.0.0.1",
                             "port": self.orthanc.port, "accepts": ["uncompressed"],
                             "max_associations": args.associations},
            )
            self.forwarder = ForwardService(self.gateway)

    def processes(self) -> dict[str, int]:
        found = {"orthanc": self.orthanc.pid}
        if self.gateway is not None and self.gateway.process is not None:
            found["appliance dicom"] = self.gateway.pid
        if self.forwarder is not None and self.forwarder.process is not None:
            found["appliance forward"] = self.forwarder.pid
        return found

    def cpu(self) -> dict[str, float | None]:
        return {name: machine.cpu_seconds(pid) for name, pid in self.processes().items()}

    def run(self) -> Run:
        revision = appliance_revision() if self.gateway is not None else ""
        try:
            self.orthanc.start()
            if self.gateway is not None:
                self.gateway.start()
            result = self._measure()
        except peers.PeerError as exc:
            self.problems.append(str(exc))
            result = Run(self.kind, self.round, len(self.images), 0, 0.0, 0.0, None)
        finally:
            self._stop()
        result.revision = revision
        if self.problems:
            result.ok, result.problem = False, "; ".join(self.problems)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)  # a failed run keeps its evidence
        return result

    def _stop(self) -> None:
        for name, stop in (("appliance forward", self.forwarder.stop if self.forwarder else None),
                           ("appliance dicom", self.gateway.stop if self.gateway else None),
                           ("orthanc", self.orthanc.stop)):
            if stop is None:
                continue
            try:
                code = stop()
            except peers.PeerError as exc:
                self.problems.append(str(exc))
                continue
            if name.startswith("appliance") and code not in (0, None):
                tail = self.forwarder.log_tail() if name == "appliance forward" and self.forwarder else (
                    self.gateway.log_tail() if self.gateway else "")
                self.problems.append(f"{name} exited {code} on SIGTERM:\n{tail}")

    def _send(self, port: int, aet: str, files: list[Path] | None = None) -> peers.SendResult:
        config = self.workdir / "storescu-log.cfg"
        config.write_text(ACK_LOG_CONFIG, encoding="utf-8")
        sent = peers.storescu(port, self.files if files is None else files, called_aet=aet,
                              options=("-lc", str(config)))
        if sent.returncode != 0:
            self.problems.append(f"storescu exited {sent.returncode}: {sent.stderr.strip()[-500:]}")
        return sent

    def _quiet(self) -> float:
        os.sync()  # earlier runs' dirty pages must not be written back on this run's time
        waited, busy = machine.wait_for_quiet(self.orthanc.pid, timeout=self.args.quiet_timeout)
        if waited > 2:
            print(f"  waited {waited:.0f} s for other work on the machine to calm down "
                  f"({busy:.2f} CPUs busy at the end)", file=sys.stderr)
        return waited

    def _measure(self) -> Run:
        expected = {image.orthanc_id for image in self.images}
        if self.kind == "drain":
            assert self.gateway is not None
            self._send(self.gateway.port, self.gateway.aet)  # the backlog: received, not yet forwarded
        elif self.kind in ("forward", "single"):
            assert self.forwarder is not None
            self.forwarder.start()
        waited = self._quiet()
        watcher = ArrivalWatcher(self.orthanc, expected)
        watcher.start()
        cpu_before, sample_before = self.cpu(), machine.MachineSample()
        start = time.time()
        sent: peers.SendResult | None = None
        acks: dict[str, float] = {}
        if self.kind == "direct":
            sent = self._send(self.orthanc.port, self.orthanc.aet)
        elif self.kind == "forward":
            assert self.gateway is not None
            sent = self._send(self.gateway.port, self.gateway.aet)
            acks, problem = ack_times(sent.stdout, self.images)
            if problem:
                self.problems.append(problem)
        elif self.kind == "single":
            acks = self._send_one_by_one(watcher)
        else:
            assert self.forwarder is not None
            self.forwarder.start()
            start = self.forwarder.ready_at
            cpu_before["appliance forward"] = 0.0  # its whole life is the drain
        arrived = watcher.wait(self.args.arrival_timeout)
        cpu_after, sample_after = self.cpu(), machine.MachineSample()
        last = max(watcher.arrivals.values(), default=start)
        peak = self.forwarder.peak_rss_bytes() if self.forwarder and self.forwarder.process else None
        if not arrived:
            self.problems.append(watcher.error or f"only {len(watcher.arrivals)} of {len(expected)} images "
                                 f"reached Orthanc within {self.args.arrival_timeout} s")
        if watcher.unexpected:
            self.problems.append(f"{len(watcher.unexpected)} unexpected instance(s) at Orthanc, "
                                 f"e.g. {watcher.unexpected[0]}")
        if self.kind == "direct":
            assert sent is not None
            seconds = sent.seconds  # the same measure as bench/receive.py
        else:
            seconds = last - start
        cpu = {name: (round(cpu_after[name] - before, 2) if cpu_after.get(name) is not None
                      and before is not None else None) for name, before in cpu_before.items()}
        if sent is not None:
            cpu["storescu"] = round(sent.cpu_seconds, 2)
        elif self.kind == "single":
            cpu["storescu"] = round(self.single_storescu_cpu, 2)
        accounted = sum(v for v in cpu.values() if v is not None)
        other, kernel = machine.other_cpu_seconds(sample_before, sample_after, accounted)

        latencies = [(watcher.arrivals[image.orthanc_id] - acks[image.sop_instance_uid]) * 1000
                     for image in self.images
                     if image.orthanc_id in watcher.arrivals and image.sop_instance_uid in acks]
        self._check(expected)
        result = Run(
            kind=self.kind, round=self.round, images=len(self.images), arrived=len(watcher.arrivals),
            seconds=round(seconds, 3),
            images_per_second=round(len(self.images) / seconds, 1) if seconds else 0.0,
            sender_seconds=round(sent.seconds, 3) if sent is not None and self.kind == "forward" else None,
            latency_ms=summary(latencies),
            arrival_window_ms=summary([w * 1000 for w in watcher.windows]),
            cpu_seconds=cpu, other_cpu_seconds=round(other, 2), kernel_threads_cpu_seconds=round(kernel, 2),
            forwarder_peak_rss_bytes=peak,
            associations=self.gateway.associations() if self.gateway is not None else None,
            polls=watcher.polls, waited_for_quiet_seconds=round(waited, 1), latencies_ms=latencies,
        )
        return result

    def _send_one_by_one(self, watcher: ArrivalWatcher) -> dict[str, float]:
        """Each image on its own association once the previous one arrived, after a random pause.

        The way a CR or DX modality sends: one image now and then, to an idle
        gateway. The pause (0-0.5 s, seeded) spreads the sends over the
        forwarder's 0.5-s idle poll, so the latency is its average, not one
        phase of it.
        """
        assert self.gateway is not None
        pauses = random.Random(20240604 + self.round)
        acks: dict[str, float] = {}
        self.single_storescu_cpu = 0.0
        for image in self.images:
            time.sleep(pauses.uniform(0.0, 0.5))
            sent = self._send(self.gateway.port, self.gateway.aet, [image.path])
            self.single_storescu_cpu += sent.cpu_seconds
            ack, problem = ack_times(sent.stdout, [image])
            if problem:
                self.problems.append(problem)
                break
            acks.update(ack)
            deadline = time.monotonic() + 30
            while image.orthanc_id not in watcher.arrivals and time.monotonic() < deadline:
                time.sleep(0.005)
        return acks

    def _check(self, expected: set[str]) -> None:
        """What each end holds, from its own side."""
        stored = self.orthanc.stored_count()
        if stored != len(expected):
            self.problems.append(f"Orthanc holds {stored} of {len(expected)} images")
        if self.gateway is None:
            return
        deadline = time.monotonic() + 30  # jobs are marked done after their batch's last response
        states = self.gateway.job_states()
        while states != {"done": len(self.images)} and time.monotonic() < deadline:
            time.sleep(0.25)
            states = self.gateway.job_states()
        if states != {"done": len(self.images)}:
            self.problems.append(f"forward jobs by state: {states} (expected {len(self.images)} done)")


# --- report -------------------------------------------------------------------------


def median_run(runs: list[Run], kind: str) -> Run:
    """The median run: by rate, or by p50 latency for single images (the lower middle one)."""
    if kind == "single":
        ordered = sorted(runs, key=lambda r: r.latency_ms.get("p50", 0.0))
    else:
        ordered = sorted(runs, key=lambda r: r.images_per_second)
    return ordered[(len(ordered) - 1) // 2]


def _mb(value: int | None) -> str:
    return f"{value / 1e6:.0f} MB" if value is not None else "-"


LABELS = {"direct": "storescu -> Orthanc (direct)",
          "forward": "storescu -> appliance -> Orthanc",
          "drain": "backlog: appliance -> Orthanc",
          "single": "one image at a time"}


def report(runs: list[Run], spec: synthetic.CTSpec, image_bytes: int, rounds: int,
           args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables and the ratio; return the summary for the JSON file."""
    chosen = {kind: median_run([r for r in runs if r.kind == kind], kind)
              for kind in KINDS if any(r.kind == kind for r in runs)}
    print()
    print(f"Forwarding: {spec.count} synthetic {spec.rows}x{spec.columns} 16-bit CT images "
          f"({image_bytes / 1e3:.0f} kB each), storescu over one association; [forward] batch_size "
          f"{args.batch_size}, max_associations {args.associations}; median of {rounds} round(s)")
    print()
    header = f"{'path':<34}{'images':>7}{'seconds':>9}{'images/s':>10}   images/s in each round"
    print(header)
    print("-" * len(header))
    for kind, run in chosen.items():
        if kind == "single":
            continue
        rates = " ".join(f"{r.images_per_second:.0f}" for r in runs if r.kind == kind)
        print(f"{LABELS[kind]:<34}{run.arrived:>7}{run.seconds:>9.2f}{run.images_per_second:>10.1f}"
              f"   {rates}")
        if kind == "forward" and run.sender_seconds:
            print(f"{'  of which storescu -> appliance':<34}{run.images:>7}{run.sender_seconds:>9.2f}"
                  f"{run.images / run.sender_seconds:>10.1f}   (the appliance acks while it forwards)")
    print()
    ratios: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    for kind in ("forward", "drain"):
        if kind in chosen and "direct" in chosen:
            key = f"{kind}/direct"
            ratios[key] = round(chosen[kind].images_per_second / chosen["direct"].images_per_second, 3)
            by_round = {(r.round, r.kind): r.images_per_second for r in runs}
            per_round[key] = [round(by_round[(n, kind)] / by_round[(n, "direct")], 3)
                              for n in sorted({r.round for r in runs})
                              if (n, kind) in by_round and (n, "direct") in by_round]
            spread = " ".join(f"{v:.2f}" for v in per_round[key])
            what = "end-to-end" if kind == "forward" else "backlog drain"
            print(f"ratio {what} / direct storescu -> Orthanc: {ratios[key]:.2f}   (in each round: {spread})")
    pooled: dict[str, dict[str, float]] = {}
    latency_kinds = [kind for kind in ("forward", "single") if kind in chosen]
    if latency_kinds:
        print()
        print("latency, ack at the appliance -> stored at Orthanc (ms):")
    for kind in latency_kinds:
        run = chosen[kind]
        mine = [r for r in runs if r.kind == kind]
        pooled[kind] = summary([v for r in mine for v in r.latencies_ms])
        lat, every = run.latency_ms, pooled[kind]
        what = f"{run.images} at once" if kind == "forward" else f"{run.images} one at a time"
        print(f"  {what:<18} median round  p50 {lat.get('p50', 0):6.0f}  p95 {lat.get('p95', 0):6.0f}  "
              f"max {lat.get('max', 0):6.0f}   all {len(mine)} round(s)  p50 {every.get('p50', 0):6.0f}  "
              f"p95 {every.get('p95', 0):6.0f}  max {every.get('max', 0):6.0f}")
    if latency_kinds:
        window = chosen[latency_kinds[0]].arrival_window_ms
        print(f"  resolution: arrival stamped mid-window, window p50 {window.get('p50', 0):.0f} ms "
              f"(max {window.get('max', 0):.0f} ms); acks to 1 ms")
    if "forward" in chosen:
        run = chosen["forward"]
        print(f"  forwarder ({run.images} at once): {run.associations} association(s), "
              f"peak RSS {_mb(run.forwarder_peak_rss_bytes)}")
    print()
    print("CPU seconds in the timed window (median round):")
    for kind, run in chosen.items():
        parts = "  ".join(f"{name} {value:.1f}" for name, value in run.cpu_seconds.items()
                          if value is not None)
        print(f"  {kind:<8} {parts}  other {run.other_cpu_seconds or 0:.1f}  kernel threads "
              f"{run.kernel_threads_cpu_seconds or 0:.1f}")
    busiest = max((r.busy_cpus_during for r in runs if r.kind != "single"), default=0.0)
    if busiest > DISTURBED_CPUS:
        print(f"note: other processes kept up to {busiest:.2f} of the {os.cpu_count()} CPUs busy during "
              "a counted run; absolute rates are then low and noisy, ratios less so")
    return {"median": {kind: {k: v for k, v in asdict(run).items() if k != "latencies_ms"}
                       for kind, run in chosen.items()},
            "ratios": ratios, "ratios_per_round": per_round, "latency_ms_all_rounds": pooled}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="images to send (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="times each path is measured (default 3)")
    parser.add_argument("--quick", action="store_true", help="100 images, one round: a smoke test")
    parser.add_argument("--paths", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--single", type=int, default=20,
                        help="images sent one at a time for the idle-gateway latency (default 20)")
    parser.add_argument("--batch-size", type=int, default=200,
                        help="[forward] batch_size: objects of one study per association (default 200, "
                             "the appliance's default)")
    parser.add_argument("--associations", type=int, default=1,
                        help="[[destination]] max_associations (default 1, the appliance's default)")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "work-forward",
                        help="where peers keep their data; must be the disk being measured, not tmpfs")
    parser.add_argument("--quiet-timeout", type=float, default=120.0,
                        help="before each run, wait up to this many seconds for other processes to leave "
                             "the CPUs idle (default 120; 0 = one 1-s reading, no waiting)")
    parser.add_argument("--retries", type=int, default=2,
                        help="measure a run again (up to this many times) when other processes kept over "
                             f"{DISTURBED_CPUS} CPUs busy during it (default 2)")
    parser.add_argument("--arrival-timeout", type=float, default=300.0,
                        help="give up when Orthanc lacks images this long after the start (default 300 s)")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache", help="synthetic images cache")
    parser.add_argument("--output", type=Path, default=RESULTS / "forward.json", help="results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.rounds, args.single = 100, 1, 10
    kinds = [k.strip() for k in args.paths.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--paths: choose from {', '.join(KINDS)}")

    spec = synthetic.CTSpec(count=args.count)
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    print(f"preparing {spec.count} synthetic CT images in {args.cache} ...", file=sys.stderr)
    files = synthetic.cached(spec, args.cache)
    total_bytes = sum(path.stat().st_size for path in files)
    images = read_images(files)
    warm_page_cache(files)
    print(f"ready in {time.monotonic() - started:.1f} s; peers work in {args.workdir} "
          f"({filesystem(args.workdir.parent)})", file=sys.stderr)

    runs: list[Run] = []
    for round_ in range(1, args.rounds + 1):
        for kind in kinds:
            for attempt in range(args.retries + 1):
                subset = images[:args.single] if kind == "single" else images
                run = Measurement(kind, round_, subset, args.workdir, args).run()
                runs.append(run)
                status = "ok" if run.ok else f"FAILED: {run.problem}"
                latency = (f" latency p50 {run.latency_ms['p50']:.0f} ms p95 {run.latency_ms['p95']:.0f} ms"
                           if run.latency_ms else "")
                print(f"round {round_} {kind:<8}{run.seconds:7.2f} s {run.images_per_second:7.1f} images/s"
                      f"{latency}  {status}", file=sys.stderr)
                # One image at a time leaves the CPUs mostly idle for seconds: the
                # machine's background shows as "other" there without slowing anything.
                if (not run.ok or kind == "single" or run.busy_cpus_during <= DISTURBED_CPUS
                        or attempt == args.retries):
                    break
                run.disturbed = True
                print(f"  disturbed: other processes kept {run.busy_cpus_during:.2f} CPUs busy; "
                      "measuring again", file=sys.stderr)
            if not runs[-1].ok:
                break
        if runs and not runs[-1].ok:
            break

    counted = [r for r in runs if r.ok and not r.disturbed] or runs
    summary_ = report(counted, spec, total_bytes // len(files), args.rounds, args)
    document = {
        "benchmark": "forward",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "filesystem": filesystem(args.workdir.parent),
        "versions": versions(),
        "appliance_revision": appliance_revision(),
        "load_average_at_start": load_at_start,
        "images": asdict(spec),
        "image_bytes": total_bytes // len(files),
        "batch_size": args.batch_size,
        "max_associations": args.associations,
        "poll_seconds": POLL_SECONDS,
        "rounds": args.rounds,
        "runs": [{k: v for k, v in asdict(r).items() if k != "latencies_ms"} for r in runs],
        "disturbed_cpus_threshold": DISTURBED_CPUS,
        **summary_,
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {args.output} ({document['elapsed_seconds']} s in all)")
    failed = [r for r in runs if not r.ok]
    for run in failed:
        print(f"FAILED: round {run.round} {run.kind}: {run.problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
