"""Receive throughput: the appliance against DCMTK storescp and Orthanc, in one run.

    .venv/bin/python bench/receive.py              # what `make bench` runs
    .venv/bin/python bench/receive.py --quick      # 100 images, one round: a smoke test
    .venv/bin/python bench/receive.py --senders 1,4  # one association, then 4 storescu in parallel

The same synthetic CT files (512x512, 16-bit, Explicit VR Little Endian) are
sent by DCMTK storescu over ONE association into each peer, then (`--senders
1,4`, the default) by 4 storescu at once, each over its own association with
a quarter of the files, into each peer started fresh on a loopback port with
an empty data directory on the same disk:

    storescp        DCMTK's reference receiver: writes each file, never fsyncs
    orthanc         Orthanc as packaged (SyncStorageArea = true: fdatasync per file;
                    its SQLite index commits are not synced)
    orthanc-nosync  Orthanc with SyncStorageArea = false, to show what that fsync costs it
    appliance       `appliance dicom`: fsync file + directory + SQLite commit per image,
                    all before the C-STORE response (the durability rule)

Only the storescu run is timed (process start to exit; the sender waits for
every response, and every peer answers only after storing). Each peer must
then hold every image, counted from its own storage (files, Orthanc's REST
/statistics, `appliance find --json`), or the run fails. The appliance's peak
RSS is its process's VmHWM, read just before it is stopped.

Peers are measured in rounds (each peer once per round, in turn) and the
median round is reported, so a slow moment of the machine hits every peer
alike instead of one. Dirty pages are synced before each timed send, so one
peer's unsynced writes are not flushed on the next peer's time.

The machine may be shared (other sessions run test suites on the same two
cores): before each send the benchmark waits for the CPUs to be idle, and a
send during which other processes took more than DISTURBED_CPUS is measured
again and not counted. Ratios against peers measured in the same run travel
between machines; the absolute rates do not. docs/PERFORMANCE.md
records the results and what they mean.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import resource
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import machine
import peers
import pydicom
import pynetdicom
import synthetic

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PEER_NAMES = ("storescp", "orthanc", "orthanc-nosync", "appliance")
# A send during which other processes kept more CPUs busy than this, on average,
# measured the neighbours as much as the peer: it is repeated and not counted.
DISTURBED_CPUS = 0.15


@dataclass
class Run:
    """One timed send into one freshly started peer."""

    peer: str
    round: int
    senders: int
    images: int
    stored: int
    seconds: float
    images_per_second: float
    mb_per_second: float
    peak_rss_bytes: int | None
    rss_before_send_bytes: int | None
    cpu_seconds: float | None
    storescu_cpu_seconds: float
    other_cpu_seconds: float | None
    kernel_threads_cpu_seconds: float | None
    storescu_returncode: int
    waited_for_quiet_seconds: float
    busy_cpus_before_send: float
    ok: bool
    problem: str = ""
    disturbed: bool = False
    revision: str = ""

    @property
    def busy_cpus_during_send(self) -> float:
        """CPUs kept busy by other processes during the send, on average."""
        return (self.other_cpu_seconds or 0.0) / self.seconds


def make_peer(name: str, workdir: Path) -> peers.Peer:
    """The peer called `name`, configured as this benchmark documents it."""
    factories: dict[str, Callable[[], peers.Peer]] = {
        "storescp": lambda: peers.StoreSCP(workdir=workdir),
        "orthanc": lambda: peers.Orthanc(workdir=workdir, sync_storage=True),
        "orthanc-nosync": lambda: peers.Orthanc(name="orthanc-nosync", workdir=workdir,
                                                sync_storage=False),
        "appliance": lambda: peers.Appliance(workdir=workdir),
    }
    return factories[name]()


def warm_page_cache(files: list[Path]) -> None:
    """Read the input once so the first peer measured does not pay for cold disk reads."""
    for path in files:
        with open(path, "rb") as fp:
            while fp.read(1 << 20):
                pass


def send(port: int, files: list[Path], aet: str, senders: int) -> peers.SendResult:
    """Every file through `senders` storescu processes at once, each over its own association.

    The files are dealt out in turn; the clock runs from before the first
    process starts to the exit of the last, and the CPU time is that of all
    of them together.
    """
    if senders == 1:
        return peers.storescu(port, files, called_aet=aet)
    shares = [files[n::senders] for n in range(senders)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        results = list(pool.map(lambda share: peers.storescu(port, share, called_aet=aet), shares))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return peers.SendResult(seconds, max(r.returncode for r in results), "".join(r.stdout for r in results),
                            "".join(r.stderr for r in results), cpu)


def measure(name: str, files: list[Path], total_bytes: int, workdir: Path, round_: int,
            quiet_timeout: float, senders: int = 1) -> Run:
    """Start `name` fresh, send every file over `senders` parallel associations, check, stop, clean up."""
    peer = make_peer(name, workdir / name)
    problems: list[str] = []
    # The tree may move between rounds while others work in it: say which code each run measured.
    revision = appliance_revision() if isinstance(peer, peers.Appliance) else ""
    peer.start()
    try:
        os.sync()  # earlier peers' dirty pages must not be written back on this peer's time
        waited, busy_before = machine.wait_for_quiet(peer.pid, timeout=quiet_timeout)
        if waited > 2:
            print(f"  waited {waited:.0f} s for other work on the machine to calm down "
                  f"({busy_before:.2f} CPUs busy at the end)", file=sys.stderr)
        rss_before = peer.rss_bytes()
        cpu_before, machine_before = peer.cpu_seconds(), machine.MachineSample()
        sent = send(peer.port, files, peer.aet, senders)
        cpu_after, machine_after = peer.cpu_seconds(), machine.MachineSample()
        peak_rss = peer.peak_rss_bytes()
        if isinstance(peer, peers.Appliance):
            rows = peer.find()
            stored = len(rows)
            syntaxes = {row["transfer_syntax_uid"] for row in rows}
            if rows and syntaxes != {str(pydicom.uid.ExplicitVRLittleEndian)}:
                problems.append(f"appliance stored transfer syntaxes {sorted(syntaxes)}")
        else:
            stored = peer.stored_count()
    finally:
        code = peer.stop()
    if sent.returncode != 0:
        problems.append(f"storescu exited {sent.returncode}: {sent.stderr.strip()[-500:]}")
    if stored != len(files):
        problems.append(f"{name} holds {stored} of {len(files)} images")
    if isinstance(peer, peers.Appliance) and code != 0:
        problems.append(f"appliance exited {code} on SIGTERM:\n{peer.log_tail()}")
    if not problems:
        peer.cleanup()  # keep the evidence of a failed run
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    other: float | None = None
    kernel: float | None = None
    if cpu is not None:
        other, kernel = machine.other_cpu_seconds(machine_before, machine_after, cpu + sent.cpu_seconds)
    return Run(
        peer=name,
        round=round_,
        senders=senders,
        images=len(files),
        stored=stored,
        seconds=sent.seconds,
        images_per_second=len(files) / sent.seconds,
        mb_per_second=total_bytes / 1e6 / sent.seconds,
        peak_rss_bytes=peak_rss,
        rss_before_send_bytes=rss_before,
        cpu_seconds=cpu,
        storescu_cpu_seconds=sent.cpu_seconds,
        other_cpu_seconds=other,
        kernel_threads_cpu_seconds=kernel,
        storescu_returncode=sent.returncode,
        waited_for_quiet_seconds=round(waited, 1),
        busy_cpus_before_send=round(busy_before, 2),
        ok=not problems,
        problem="; ".join(problems),
        revision=revision,
    )


def median_run(runs: list[Run]) -> Run:
    """The run with the median rate (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.images_per_second)
    return ordered[(len(ordered) - 1) // 2]


def machine_description() -> dict[str, object]:
    """What the rates were measured on: absolute numbers mean little without it."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1_000_000,
    }


def filesystem(path: Path) -> str:
    """The file system the peers write to: a tmpfs would make every fsync free."""
    try:
        result = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(path)],
                                capture_output=True, text=True, timeout=10, check=False)
        return result.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of everything measured; a peer's upgrade can move the ratios."""
    return {
        "dcmtk": peers.tool_version([peers.dcmtk("storescu"), "--version"]).strip("$ ")
        .removeprefix("dcmtk: "),
        "orthanc": peers.tool_version([peers.ORTHANC_BINARY, "--version"]),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "sqlite": sqlite3.sqlite_version,
    }


def appliance_revision() -> str:
    """The commit of the appliance code measured, marked dirty if appliance/ has local edits."""
    try:
        head = subprocess.run(["git", "-C", str(peers.REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(peers.REPO), "status", "--porcelain", "--untracked-files=no",
                                "appliance"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' (appliance/ modified)' if dirty else ''}"


def _mb(value: int | None) -> str:
    return f"{value / 1e6:.0f} MB" if value is not None else "-"


def _seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def round_ratios(runs: list[Run], numerator: str, denominator: str) -> list[float]:
    """appliance/peer within each round: peers measured seconds apart share the machine's mood."""
    rates = {(r.round, r.peer): r.images_per_second for r in runs}
    return [rates[(n, numerator)] / rates[(n, denominator)]
            for n in sorted({r.round for r in runs})
            if (n, numerator) in rates and (n, denominator) in rates]


def report(runs: list[Run], spec: synthetic.CTSpec, image_bytes: int, rounds: int,
           senders: int = 1) -> dict[str, object]:
    """Print the table and ratios; return the summary for the JSON file."""
    chosen = {name: median_run([r for r in runs if r.peer == name])
              for name in dict.fromkeys(r.peer for r in runs)}
    print()
    print(f"Receive throughput: {spec.count} synthetic {spec.rows}x{spec.columns} 16-bit CT images "
          f"({image_bytes / 1e3:.0f} kB each) sent by storescu over "
          f"{'one association' if senders == 1 else f'{senders} associations in parallel'}; "
          f"median of {rounds} round(s)")
    print()
    header = (f"{'peer':<16}{'images':>7}{'seconds':>9}{'images/s':>10}{'MB/s':>7}{'peak RSS':>10}"
              f"{'peer CPU s':>12}{'other CPU s':>13}   images/s in each round")
    print(header)
    print("-" * len(header))
    for name, run in chosen.items():
        rates = " ".join(f"{r.images_per_second:.0f}" for r in runs if r.peer == name)
        print(f"{name:<16}{run.stored:>7}{run.seconds:>9.2f}{run.images_per_second:>10.1f}"
              f"{run.mb_per_second:>7.1f}{_mb(run.peak_rss_bytes):>10}{_seconds(run.cpu_seconds):>12}"
              f"{_seconds(run.other_cpu_seconds):>13}   {rates}")
    print()
    ratios: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    if "appliance" in chosen:
        for other in ("storescp", "orthanc", "orthanc-nosync"):
            if other not in chosen:
                continue
            key = f"appliance/{other}"
            ratios[key] = round(chosen["appliance"].images_per_second / chosen[other].images_per_second, 3)
            per_round[key] = [round(v, 3) for v in round_ratios(runs, "appliance", other)]
            spread = " ".join(f"{v:.2f}" for v in per_round[key])
            print(f"ratio {key:<26}{ratios[key]:.2f}   (in each round: {spread})")
        mine = [r for r in runs if r.peer == "appliance"]
        peak = max(r.peak_rss_bytes or 0 for r in mine)
        idle = max(r.rss_before_send_bytes or 0 for r in mine)
        print(f"appliance peak RSS (VmHWM)      {_mb(peak)}   (RSS when idle before the send: {_mb(idle)})")
    busiest = max(r.busy_cpus_during_send for r in runs)
    if busiest > DISTURBED_CPUS:
        print(f"note: other processes kept up to {busiest:.2f} of the {os.cpu_count()} CPUs busy during "
              "a counted send; absolute rates are then low and noisy, ratios less so")
    return {"median": {name: asdict(run) for name, run in chosen.items()}, "ratios": ratios,
            "ratios_per_round": per_round}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="images to send (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="times each peer is measured (default 5)")
    parser.add_argument("--quick", action="store_true", help="100 images, one round: a smoke test")
    parser.add_argument("--peers", default=",".join(PEER_NAMES),
                        help=f"comma-separated subset of {','.join(PEER_NAMES)}")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "work",
                        help="where peers keep their data; must be the disk being measured, not tmpfs")
    parser.add_argument("--quiet-timeout", type=float, default=120.0,
                        help="before each send, wait up to this many seconds for other processes to "
                             "leave the CPUs idle (default 120; 0 = one 1-s reading, no waiting)")
    parser.add_argument("--retries", type=int, default=2,
                        help="measure a send again (up to this many times) when other processes kept "
                             f"over {DISTURBED_CPUS} CPUs busy during it (default 2)")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache", help="synthetic images cache")
    parser.add_argument("--senders", default="1,4",
                        help="comma-separated numbers of storescu sending at once, each measured and "
                             "reported in turn (default 1,4: one association, then 4 in parallel)")
    parser.add_argument("--output", type=Path, default=RESULTS / "receive.json", help="results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.rounds = 100, 1
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown or not names:
        parser.error(f"unknown peer(s) {unknown}; choose from {', '.join(PEER_NAMES)}")

    spec = synthetic.CTSpec(count=args.count)
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    print(f"preparing {spec.count} synthetic CT images in {args.cache} ...", file=sys.stderr)
    files = synthetic.cached(spec, args.cache)
    total_bytes = sum(path.stat().st_size for path in files)
    warm_page_cache(files)
    print(f"ready in {time.monotonic() - started:.1f} s; peers work in {args.workdir} "
          f"({filesystem(args.workdir.parent)})", file=sys.stderr)

    try:
        sender_counts = [int(n) for n in args.senders.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--senders {args.senders!r}: comma-separated positive integers, e.g. 1,4")
    if not sender_counts or min(sender_counts) < 1:
        parser.error(f"--senders {args.senders!r}: comma-separated positive integers, e.g. 1,4")

    runs: list[Run] = []
    for senders, round_ in [(s, r) for s in sender_counts for r in range(1, args.rounds + 1)]:
        for name in names:
            for attempt in range(args.retries + 1):
                try:
                    run = measure(name, files, total_bytes, args.workdir, round_, args.quiet_timeout, senders)
                except peers.PeerError as exc:
                    print(f"receive benchmark: {exc}", file=sys.stderr)
                    return 1
                runs.append(run)
                status = "ok" if run.ok else f"FAILED: {run.problem}"
                print(f"round {round_} x{senders} {name:<15} {run.seconds:7.2f} s "
                      f"{run.images_per_second:8.1f} images/s "
                      f"peak RSS {_mb(run.peak_rss_bytes)}  {status}", file=sys.stderr)
                if not run.ok or run.busy_cpus_during_send <= DISTURBED_CPUS or attempt == args.retries:
                    break
                run.disturbed = True
                print(f"  disturbed: other processes kept {run.busy_cpus_during_send:.2f} CPUs busy "
                      "during the send; measuring again", file=sys.stderr)

    summaries = {}
    for senders in sender_counts:
        mine = [r for r in runs if r.senders == senders]
        counted = [r for r in mine if r.ok and not r.disturbed] or mine
        summaries[senders] = report(counted, spec, total_bytes // len(files), args.rounds, senders)
    summary = dict(summaries[sender_counts[0]])
    summary["by_senders"] = {str(n): value for n, value in summaries.items()}
    document = {
        "benchmark": "receive",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "filesystem": filesystem(args.workdir.parent),
        "versions": versions(),
        "appliance_revision": appliance_revision(),
        "load_average_at_start": load_at_start,
        "images": asdict(spec),
        "image_bytes": total_bytes // len(files),
        "total_bytes": total_bytes,
        "rounds": args.rounds,
        "runs": [asdict(r) for r in runs],
        "disturbed_cpus_threshold": DISTURBED_CPUS,
        **summary,
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {args.output} ({document['elapsed_seconds']} s in all)")
    failed = [r for r in runs if not r.ok]
    for run in failed:
        print(f"FAILED: round {run.round} {run.peer}: {run.problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
