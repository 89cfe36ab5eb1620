"""Copy throughput to external disks: `appliance disks copy` against `cp -a` + sync, in one run.

    .venv/bin/python bench/disks.py              # 2,000 images, 3 rounds (part of `make bench`)
    .venv/bin/python bench/disks.py --quick      # 200 images, one round: a smoke test
    .venv/bin/python bench/disks.py --profile    # + one py-spy sampled appliance copy, by step

The appliance's nightly job copies the internal archive to both disks of the
active pair, and a copy counts only once it is fsynced, read back from the
disk (its cached pages dropped first), checked against the archive's sha256
and recorded in the index. A clinic compares that with what it did before:
a copy script. So in each round the same files go, on the same two file
systems, by three methods:

    appliance        `appliance disks copy`, [disks] pause_ms = 0: batches of up to
                     200 files written (temp name, rename), one syncfs of the disk,
                     read back + sha256, one index transaction; the primary and the
                     mirror at once (a thread each), each disk's read-back of one
                     batch overlapping the writing of the next (one process, wall
                     clock from its start to its exit, interpreter start included)
    appliance-pause  the same with the service's default pause_ms = 5, which pauses
                     only while images are arriving (none arrive here): shows that
                     the default costs a quiet gateway nothing; not compared
    cp               `cp -a <data_dir>/archive <disk>/cp-test` to the primary, then
                     to the mirror (sequentially: what a copy script does), then
                     `sync -f` of the two disks: the time includes the flush, so
                     both methods end with the bytes on the disks (cp -a without
                     the sync is reported too; it ends with them in memory)
    cp-readback      cp, then the copies' cached pages dropped and every copy read
                     back from the two disks (`cat` to /dev/null, no hash): the I/O
                     that any copy verified by reading it back needs on these disks,
                     to tell the verification's unavoidable cost from the rest

The ratio the issue asks for is appliance images/s over cp images/s (cp with
its sync); appliance/cp-readback is printed too.

The disks are real ext4 file systems: two image files (preallocated with
fallocate, `mkfs.ext4 -m 0 -L LABEL` with the inode tables and journal
initialised up front so no lazy-init thread writes during a timed run)
attached with `losetup --direct-io=on`, so a read of a disk reaches the
virtual disk below instead of a second page cache holding the image file,
and mounted under bench/results/work/disks. They are adopted by label like
field disks (`appliance disks adopt LABEL --role primary|mirror`), and are
always unmounted and detached at the end, even after a failure or Ctrl-C.

Before each timed run both disks are emptied (the appliance's copies and
index rows of copies, or cp's folder), the disks and the archive are
synced, and the archive's files and index are evicted from the page cache
(posix_fadvise DONTNEED on each file, checked with fincore), so every method
reads its source from the disk. `--drop-caches global` does `sync; echo 3 >
/proc/sys/vm/drop_caches` instead, as on a machine of one's own; the
default evicts only this benchmark's files because other sessions on this
machine warm their own inputs once and measure for minutes.

The machine may be shared: each run waits for idle CPUs first and is
measured again when other processes took more than DISTURBED_CPUS during it
(as in bench/receive.py); /proc/diskstats deltas (bytes read and written,
flushes) of the two loop devices and the virtual disk are recorded per run,
which also shows what verification reads and how many flushes each method
issues. Checks (a failed one fails the run): the appliance reports 2 x count
verified copies, the index holds count copies per disk, and each disk then
holds count files of the archive's total size, for every method.
Results: a table on stdout, everything in bench/results/disks.json;
docs/PERFORMANCE.md ("External disks") says what they mean.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import linecache
import math
import os
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import machine
import peers
import receive
import synthetic

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
METHODS = ("appliance", "cp", "cp-parallel", "cp-readback", "appliance-pause")
DEFAULT_PAUSE_MS = 5.0  # appliance/config.py DisksSettings.pause_ms: the service's throttle
# Same rule as bench/receive.py: a run during which other processes kept more
# CPUs busy than this, on average, measured them too; it is repeated, not counted.
DISTURBED_CPUS = 0.15
# Other sessions' disk writes slow cp (bandwidth-bound) more than the appliance (flush-bound):
# a run during which the machine's disk took this many MB more writes than the two loop
# devices passed down to it is repeated too. The appliance's own extra is ~170 MB (its
# index, the host file system's journal); cp's is under 10 MB.
DISTURBED_WRITE_MB = 250.0
PY_SPY = Path("/tmp/pyspy/py_spy-0.4.3.data/scripts/py-spy")


class BenchError(RuntimeError):
    """Setting up the disks or the archive failed; the message says which command."""


def run(*command: str | Path, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A set-up command (mkfs, losetup, mount, ...); fail loudly with its stderr."""
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                            check=False)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(map(str, command))} exited {result.returncode}: "
                         f"{result.stderr.strip() or result.stdout.strip()}")
    return result


# --- the disks ------------------------------------------------------------------------


@dataclass
class LoopDisk:
    """An ext4 image file on a loop device, mounted: a USB disk for the appliance."""

    label: str
    image: Path
    mountpoint: Path
    device: str = ""

    def create(self, size_bytes: int) -> None:
        """fallocate (not a sparse file: the first write into a hole of the image pays the
        host file system's block allocation, which would make the first run slower than
        the later ones), mkfs with everything initialised now, attach with direct I/O, mount."""
        self.image.unlink(missing_ok=True)
        run("fallocate", "-l", str(size_bytes), self.image)
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-L", self.label,
            "-E", "lazy_itable_init=0,lazy_journal_init=0", self.image)
        self.device = run("losetup", "--find", "--show", "--direct-io=on", self.image).stdout.strip()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        run("mount", self.device, self.mountpoint)

    def remove(self) -> list[str]:
        """Unmount (lazily if busy), detach, delete the image; return what went wrong."""
        problems: list[str] = []
        if os.path.ismount(self.mountpoint) and run("umount", self.mountpoint, check=False).returncode != 0:
            lazy = run("umount", "-l", self.mountpoint, check=False)
            if lazy.returncode != 0:
                problems.append(f"umount {self.mountpoint}: {lazy.stderr.strip()}")
        for line in run("losetup", "-j", self.image, check=False).stdout.splitlines():
            device = line.split(":", 1)[0]
            detached = run("losetup", "-d", device, check=False)
            if detached.returncode != 0:
                problems.append(f"losetup -d {device}: {detached.stderr.strip()}")
        self.image.unlink(missing_ok=True)
        return problems

    @property
    def name(self) -> str:
        """The kernel's name of the loop device, as in /proc/diskstats."""
        return Path(self.device).name


def remove_stale(workdir: Path) -> None:
    """A run killed with SIGKILL leaves its disks mounted: unmount and detach them first."""
    if not workdir.exists():
        return
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        stale = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{workdir}/")]
    for mountpoint in sorted(stale, reverse=True):
        if run("umount", mountpoint, check=False).returncode != 0:
            run("umount", "-l", mountpoint, check=False)
    for image in workdir.glob("*.img"):
        for line in run("losetup", "-j", image, check=False).stdout.splitlines():
            run("losetup", "-d", line.split(":", 1)[0], check=False)
    shutil.rmtree(workdir, ignore_errors=True)


def files_and_bytes(root: Path) -> tuple[int, int]:
    """(number of regular files, their total size) under `root`."""
    count = size = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            count += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return count, size


# --- the appliance --------------------------------------------------------------------


@dataclass
class Gateway:
    """An appliance data_dir holding the images, and the two configurations used on it."""

    workdir: Path
    launcher: Path | None = None  # a script run instead of `-m appliance` (experiments)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def config(self, pause_ms: float) -> Path:
        """The configuration with [disks] copy_window "always" and this pause between files.

        min_free_gb is small (50 MB) so the pair never rotates: the disks are
        sized to hold one copy of the images with room to spare.
        """
        path = self.workdir / f"appliance-pause{pause_ms:g}.toml"
        if not path.exists():
            path.write_text(
                "[node]\n"
                f"data_dir = {json.dumps(str(self.data_dir))}\n"
                "min_free_mb = 100\n"
                "\n[disks]\n"
                'copy_window = "always"\n'
                "spool_days = 30\n"
                "min_free_gb = 0.05\n"
                f"pause_ms = {pause_ms!r}\n",
                encoding="utf-8",
            )
        return path

    def command(self, pause_ms: float, *args: str) -> list[str]:
        entry = [str(self.launcher)] if self.launcher else ["-m", "appliance"]
        return [sys.executable, *entry, "--config", str(self.config(pause_ms)), *args]

    def env(self) -> dict[str, str]:
        """The working tree's code, whatever the venv has installed."""
        path = os.environ.get("PYTHONPATH")
        return {**os.environ, "PYTHONPATH": f"{peers.REPO}{os.pathsep}{path}" if path else str(peers.REPO)}

    def cli(self, *args: str, timeout: float = 600.0) -> str:
        """An untimed `appliance` command (import, adopt); fail loudly."""
        result = subprocess.run(self.command(0.0, *args), capture_output=True, text=True, timeout=timeout,
                                env=self.env(), cwd=peers.REPO, check=False)
        if result.returncode != 0:
            raise BenchError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result.stdout

    def copies_per_disk(self) -> dict[str, int]:
        """Recorded copies per disk label, from the index itself."""
        with contextlib.closing(sqlite3.connect(self.data_dir / "index.sqlite")) as index:
            rows = index.execute("SELECT d.label, COUNT(c.sop_instance_uid) FROM disks d LEFT JOIN "
                                 "disk_copies c ON c.disk_uuid = d.uuid GROUP BY d.label").fetchall()
        return {label: count for label, count in rows}

    def forget_copies(self) -> None:
        """Empty the record of copies, so the next `disks copy` copies everything again.

        The benchmark's own index, changed between runs only: the disks keep
        their adoption (identity file and row), as a pair emptied by hand would.
        """
        with contextlib.closing(sqlite3.connect(self.data_dir / "index.sqlite")) as index:
            index.execute("PRAGMA busy_timeout = 10000")
            index.execute("DELETE FROM disk_copies")
            index.commit()


# --- page cache and block-device counters ---------------------------------------------


def evict(paths: list[Path]) -> None:
    """Drop the cached pages of these files (they must be clean: sync first)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux fincore), to prove an eviction."""
    if not paths or shutil.which("fincore") is None:
        return None
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                            capture_output=True, text=True, timeout=120, check=False)
    try:
        return sum(int(line) for line in result.stdout.split())
    except ValueError:
        return None


@dataclass
class BlockCounters:
    """Per-device totals from /proc/diskstats: sectors read and written, flushes."""

    devices: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @classmethod
    def read(cls, names: list[str]) -> BlockCounters:
        found: dict[str, tuple[int, int, int]] = {}
        for line in Path("/proc/diskstats").read_text(encoding="ascii").splitlines():
            fields = line.split()
            if len(fields) >= 14 and fields[2] in names:
                flushes = int(fields[18]) if len(fields) >= 20 else 0  # kernels >= 5.5
                found[fields[2]] = (int(fields[5]), int(fields[9]), flushes)
        return cls(found)

    def delta(self, before: BlockCounters) -> dict[str, dict[str, float]]:
        """MB read, MB written and flushes per device since `before`."""
        out: dict[str, dict[str, float]] = {}
        for name, (read, written, flushes) in self.devices.items():
            r0, w0, f0 = before.devices.get(name, (read, written, flushes))
            out[name] = {"read_mb": round((read - r0) * 512 / 1e6, 1),
                         "written_mb": round((written - w0) * 512 / 1e6, 1), "flushes": flushes - f0}
        return out


def root_disk() -> str:
    """The block device under this repository (vda here): other sessions' I/O shows there."""
    source = run("findmnt", "-n", "-o", "SOURCE", "-T", peers.REPO, check=False).stdout.strip()
    return Path(source).name if source.startswith("/dev/") else ""


# --- one timed run ----------------------------------------------------------------------


@dataclass
class Run:
    """One timed copy of every image to both disks by one method."""

    method: str
    round: int
    images: int
    seconds: float
    images_per_second: float
    mb_per_second: float  # bytes written to the two disks, per second
    cp_seconds_without_sync: float | None
    cpu_seconds: float
    other_cpu_seconds: float
    kernel_threads_cpu_seconds: float
    waited_for_quiet_seconds: float
    busy_cpus_before: float
    source_resident_bytes_before: int | None
    io: dict[str, dict[str, float]]
    ok: bool
    problem: str = ""
    disturbed: bool = False

    @property
    def busy_cpus_during(self) -> float:
        return self.other_cpu_seconds / self.seconds

    @property
    def other_written_mb(self) -> float:
        """MB written to the machine's disk beyond what the two loop devices wrote to it."""
        loops = sum(v["written_mb"] for k, v in self.io.items() if k.startswith("loop"))
        roots = [v["written_mb"] for k, v in self.io.items() if not k.startswith("loop")]
        return round(roots[0] - loops, 1) if roots else 0.0

    @property
    def disturbance(self) -> str:
        """Why this run measured the neighbours as much as the method, or ''."""
        reasons = []
        if self.busy_cpus_during > DISTURBED_CPUS:
            reasons.append(f"other processes kept {self.busy_cpus_during:.2f} CPUs busy")
        if self.other_written_mb > DISTURBED_WRITE_MB:
            reasons.append(f"{self.other_written_mb:.0f} MB of other writes on the machine's disk")
        return " and ".join(reasons)


@dataclass
class Bench:
    """Everything a run needs: the archive, the two disks, the options."""

    gateway: Gateway
    disks: list[LoopDisk]
    sources: list[Path]  # the archive's image files, as the appliance indexed them
    image_bytes: int  # their total size
    drop_caches: str
    root_device: str

    def reset(self) -> None:
        """Empty both disks of earlier copies, sync, and put the source back on the disk only."""
        for disk in self.disks:
            shutil.rmtree(disk.mountpoint / "cp-test", ignore_errors=True)
            shutil.rmtree(disk.mountpoint / "gateway" / "archive", ignore_errors=True)
            for leftover in (disk.mountpoint / "gateway" / "tmp").glob("*"):
                leftover.unlink()
        self.gateway.forget_copies()
        # Flush the deletions now, so they are not written back on the next run's time.
        run("sync", "-f", *(d.mountpoint for d in self.disks), self.gateway.data_dir)
        if self.drop_caches == "global":
            run("sync")
            Path("/proc/sys/vm/drop_caches").write_text("3\n", encoding="ascii")
        else:
            evict(self.sources + sorted(self.gateway.data_dir.glob("index.sqlite*")))

    def measure(self, method: str, round_: int, quiet_timeout: float) -> Run:
        """Empty the disks, wait for quiet, copy every image to both disks by `method`, check."""
        self.reset()
        resident = resident_bytes(self.sources)
        waited, busy_before = machine.wait_for_quiet(timeout=quiet_timeout)
        if waited > 2:
            print(f"  waited {waited:.0f} s for other work on the machine to calm down "
                  f"({busy_before:.2f} CPUs busy at the end)", file=sys.stderr)
        names = [d.name for d in self.disks] + ([self.root_device] if self.root_device else [])
        problems: list[str] = []
        without_sync: float | None = None
        io_before, machine_before = BlockCounters.read(names), machine.MachineSample()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        if method.startswith("appliance"):
            pause = DEFAULT_PAUSE_MS if method == "appliance-pause" else 0.0
            done = subprocess.run(self.gateway.command(pause, "disks", "copy"), capture_output=True,
                                  text=True, env=self.gateway.env(), cwd=peers.REPO, timeout=1800,
                                  check=False)
            seconds = time.perf_counter() - start
            expected = f"{2 * len(self.sources)} verified copies made"
            if done.returncode != 0 or expected not in done.stdout:
                problems.append(f"appliance disks copy exited {done.returncode}, said "
                                f"{done.stdout.strip()!r} (expected {expected!r}): "
                                f"{done.stderr.strip()[-500:]}")
        else:
            def cp_to(disk: LoopDisk) -> subprocess.Popen[str]:
                return subprocess.Popen(["cp", "-a", str(self.gateway.data_dir / "archive"),
                                         str(disk.mountpoint / "cp-test")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)

            if method == "cp-parallel":  # both disks at once, as the appliance does
                copies = [cp_to(disk) for disk in self.disks]
                for copy in copies:
                    copy.wait(1800)
            else:  # one after the other: what a copy script does
                copies = []
                for disk in self.disks:
                    copies.append(cp_to(disk))
                    copies[-1].wait(1800)
            for disk, copy in zip(self.disks, copies, strict=True):
                if copy.returncode != 0:
                    problems.append(f"cp -a to {disk.label} exited {copy.returncode}: "
                                    f"{copy.stderr.read().strip()}")
            without_sync = time.perf_counter() - start
            synced = subprocess.run(["sync", "-f", *(str(d.mountpoint) for d in self.disks)],
                                    capture_output=True, text=True, timeout=600, check=False)
            if synced.returncode != 0:
                problems.append(f"sync -f exited {synced.returncode}: {synced.stderr.strip()}")
            if method == "cp-readback":
                problems += self.read_back()
            seconds = time.perf_counter() - start
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        machine_after, io_after = machine.MachineSample(), BlockCounters.read(names)
        cpu = (children_after.ru_utime + children_after.ru_stime
               - children_before.ru_utime - children_before.ru_stime)
        other, kernel = machine.other_cpu_seconds(machine_before, machine_after, cpu)
        problems += self.check(method)
        return Run(
            method=method, round=round_, images=len(self.sources), seconds=seconds,
            images_per_second=len(self.sources) / seconds,
            mb_per_second=2 * self.image_bytes / 1e6 / seconds,
            cp_seconds_without_sync=without_sync, cpu_seconds=round(cpu, 2),
            other_cpu_seconds=round(other, 2), kernel_threads_cpu_seconds=round(kernel, 2),
            waited_for_quiet_seconds=round(waited, 1), busy_cpus_before=round(busy_before, 2),
            source_resident_bytes_before=resident, io=io_after.delta(io_before),
            ok=not problems, problem="; ".join(problems),
        )

    def read_back(self) -> list[str]:
        """Read every copy back from the disks, as a verifying copy script would, but without
        hashing: the page cache of the copies is dropped (they are clean after the sync), then
        `cat` reads them to /dev/null, one disk after the other: the I/O any verified copy
        to these two disks needs, and nothing else."""
        problems = []
        for disk in self.disks:
            copies = sorted(p for p in (disk.mountpoint / "cp-test").rglob("*") if p.is_file())
            evict(copies)
            done = subprocess.run(f"find {shlex.quote(str(disk.mountpoint / 'cp-test'))} -type f -print0 | "
                                  "xargs -0 cat > /dev/null", shell=True, capture_output=True, text=True,
                                  timeout=600, check=False)
            if done.returncode != 0:
                problems.append(f"reading back {disk.label} failed: {done.stderr.strip()[-300:]}")
        return problems

    def check(self, method: str) -> list[str]:
        """Every image on each disk, the archive's bytes in all; the index agrees (appliance)."""
        problems = []
        for disk in self.disks:
            folder = disk.mountpoint / ("gateway/archive" if method.startswith("appliance") else "cp-test")
            count, size = files_and_bytes(folder)
            if (count, size) != (len(self.sources), self.image_bytes):
                problems.append(f"{disk.label} holds {count} files, {size} bytes in {folder.name}; "
                                f"expected {len(self.sources)}, {self.image_bytes}")
        if method.startswith("appliance"):
            recorded = self.gateway.copies_per_disk()
            if any(recorded.get(d.label) != len(self.sources) for d in self.disks):
                problems.append(f"index records {recorded} copies; expected {len(self.sources)} per disk")
        return problems


# --- the profile ---------------------------------------------------------------------------


def profile(bench: Bench, py_spy: Path, output: Path) -> list[tuple[str, float]]:
    """Sample one appliance copy with py-spy (wall clock, idle included, so the waits for the
    disk count), and sum the samples by the line of the appliance or standard library that
    was running: `function: source line`, e.g. `_copy_from: os.fsync(dst.fileno())`."""
    bench.reset()
    machine.wait_for_quiet(timeout=60.0)
    command = [str(py_spy), "record", "--idle", "--format", "raw", "--rate", "500", "--output", str(output),
               "--", *bench.gateway.command(0.0, "disks", "copy")]
    done = subprocess.run(command, capture_output=True, text=True, env=bench.gateway.env(), cwd=peers.REPO,
                          timeout=1800, check=False)
    if done.returncode != 0 or not output.exists():
        raise BenchError(f"py-spy exited {done.returncode}: {done.stderr.strip()[-500:]}")
    steps: collections.Counter[str] = collections.Counter()
    total = 0
    for line in output.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        steps[step_of(frames)] += int(count)
    return [(step, count / total) for step, count in steps.most_common()]


def step_of(frames: list[str]) -> str:
    """Where a py-spy stack was: the line of `disks/manager.py` running, and, when that line
    called into another appliance module, shutil or hashlib, the innermost such line too
    (e.g. `_copy_from: durable.move_durable(...) > fsync_path: os.fsync(fd)`)."""
    if not any("disks/manager.py" in f for f in frames):
        return "start-up and the rest (imports, configuration, status queries)"
    outer = inner = ""
    for frame in frames:
        function, _, where = frame.partition(" (")
        path, _, number = where.rstrip(")").rpartition(":")
        if not number.isdigit():
            continue
        if path in ("shutil.py", "hashlib.py"):  # py-spy names the standard library by file name only
            source = str(Path(shutil.__file__).with_name(path))
        elif path.startswith("appliance/"):
            source = str(peers.REPO / path)
        else:
            continue
        text = linecache.getline(source, int(number)).strip()[:60] or f"{path}:{number}"
        label = f"{function.rpartition('.')[2]}: {text}"
        if path.endswith("disks/manager.py"):
            outer, inner = label, ""
        elif outer:
            inner = label
    return f"{outer} > {inner}" if inner else outer


# --- report ------------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    """The run with the median time (the faster middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def round_ratios(runs: list[Run], numerator: str, denominator: str) -> list[float]:
    """numerator/denominator rate within each round: runs seconds apart share the machine's mood."""
    seconds = {(r.round, r.method): r.seconds for r in runs}
    return [round(seconds[(n, denominator)] / seconds[(n, numerator)], 3)
            for n in sorted({r.round for r in runs})
            if (n, numerator) in seconds and (n, denominator) in seconds]


LABELS = {"appliance": "appliance disks copy (pause_ms 0)",
          "appliance-pause": f"appliance copy (pause_ms {DEFAULT_PAUSE_MS:g}, quiet gateway)",
          "cp": "cp -a + sync -f",
          "cp-parallel": "cp -a to both disks at once + sync -f",
          "cp-readback": "cp -a + sync -f + read back (cat)"}


def report(runs: list[Run], images: int, image_bytes: int, rounds: int,
           pause_rounds: int) -> dict[str, object]:
    """Print the table and the ratios; return the summary for the JSON file."""
    chosen = {m: median_run([r for r in runs if r.method == m])
              for m in METHODS if any(r.method == m for r in runs)}
    print()
    print(f"Copy to a pair: {images} synthetic CT images ({image_bytes / images / 1e3:.0f} kB each, "
          f"{image_bytes / 1e6:.0f} MB) from the archive to the two ext4 disks of a pair; "
          f"median of {rounds} round(s), the throttled run of {min(pause_rounds, rounds)}")
    print()
    header = (f"{'method':<44}{'seconds':>8}{'images/s':>10}{'MB/s':>7}{'CPU s':>7}{'other CPU':>10}"
              f"{'disk read MB':>13}{'flushes':>9}   seconds in each round")
    print(header)
    print("-" * len(header))
    rows = [(LABELS[m], m, run) for m, run in chosen.items()]
    for label, method, run in rows:
        loops = [v for k, v in run.io.items() if k.startswith("loop")]
        read = sum(v["read_mb"] for v in loops)
        flushes = sum(int(v["flushes"]) for v in loops)
        each = " ".join(f"{r.seconds:.1f}" for r in runs if r.method == method)
        print(f"{label:<44}{run.seconds:>8.2f}{run.images_per_second:>10.1f}{run.mb_per_second:>7.1f}"
              f"{run.cpu_seconds:>7.1f}{run.other_cpu_seconds:>10.2f}{read:>13.0f}{flushes:>9}   {each}")
    if "cp" in chosen and chosen["cp"].cp_seconds_without_sync:
        bare = chosen["cp"].cp_seconds_without_sync  # the median cp run's time before its sync
        print(f"{'cp -a alone (the same runs, before sync)':<44}{bare:>8.2f}{images / bare:>10.1f}"
              f"{2 * image_bytes / 1e6 / bare:>7.1f}")
    print("(images/s: images copied to both disks per second; MB/s: bytes written to the two disks per "
          "second; disk read: from the two disks, i.e. verification)")
    print()
    ratios: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    def ratio(numerator: str, denominator: str, note: str = "") -> None:
        """numerator/denominator rate of the median runs, and within each round; printed and kept."""
        if numerator not in chosen or denominator not in chosen:
            return
        key = f"{numerator}/{denominator}"
        ratios[key] = round(chosen[denominator].seconds / chosen[numerator].seconds, 3)
        per_round[key] = round_ratios(runs, numerator, denominator)
        rounds = " ".join(f"{v:.2f}" for v in per_round[key])
        print(f"ratio {key:<22}{ratios[key]:.2f}   (in each round: {rounds}{note})")

    if "cp" in chosen:
        ratio("appliance", "cp")
        ratio("appliance-pause", "cp")
        ratio("appliance", "cp-readback")
        if "cp-readback" in chosen:
            key = "cp-readback/cp"
            ratios[key] = round(chosen["cp"].seconds / chosen["cp-readback"].seconds, 3)
            print(f"ratio {key:<22}{ratios[key]:.2f}   (what reading every copy back costs a copy script "
                  "on these disks)")
        ratio("appliance", "cp-parallel", "; cp to both disks at once")
        if "appliance/cp" in ratios:
            verdict = "met" if ratios["appliance/cp"] >= 0.8 else "NOT met"
            print(f"aim: appliance/cp >= 0.80 including verification: {verdict}")
    disturbed = [r for r in runs if r.disturbance]
    if disturbed:
        print(f"note: {len(disturbed)} counted run(s) shared the machine (other CPU or disk writes, see the "
              "JSON); absolute rates are then low and noisy, ratios less so")
    return {"median": {m: asdict(r) for m, r in chosen.items()}, "ratios": ratios,
            "ratios_per_round": per_round}


# --- main -----------------------------------------------------------------------------------


def disk_size(image_bytes: int) -> int:
    """One copy of the images, 30 % for ext4's own blocks and folders, 100 MB (above the
    50 MB min_free_gb), in MiB: large enough that the pair never rotates in a run."""
    return math.ceil((image_bytes * 1.3 + 100e6) / 2**20) * 2**20


def prepare(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> Bench:
    """Images cached, archive imported, two disks made, mounted and adopted; every disk made
    is registered on `stack` for removal before anything can fail after it."""
    spec = synthetic.CTSpec(count=args.count)
    print(f"preparing {spec.count} synthetic CT images in {args.cache} ...", file=sys.stderr)
    files = synthetic.cached(spec, args.cache)
    remove_stale(workdir)
    workdir.mkdir(parents=True)
    gateway = Gateway(workdir, args.launcher.resolve() if args.launcher else None)
    print(f"importing them into an appliance data_dir in {workdir} (not timed) ...", file=sys.stderr)
    imported = json.loads(gateway.cli("import", "--json", str(files[0].parent)))
    if imported.get("imported") != spec.count:
        raise BenchError(f"appliance import: {imported}; expected {spec.count} imported")
    sources = sorted(p for p in (gateway.data_dir / "archive").rglob("*") if p.is_file())
    image_bytes = sum(p.stat().st_size for p in sources)
    size = disk_size(image_bytes)
    tag = os.getpid() % 100_000
    disks = [LoopDisk(f"BENCH{tag}{side}", workdir / f"disk-{side}.img", workdir / f"mnt-{side}")
             for side in "AB"]
    for disk in disks:
        stack.callback(lambda d=disk: [print(f"cleanup: {p}", file=sys.stderr) for p in d.remove()])
        disk.create(size)
        if shutil.disk_usage(disk.mountpoint).free < image_bytes * 1.05 + 60e6:
            raise BenchError(f"{disk.label}: {shutil.disk_usage(disk.mountpoint).free} bytes free is too "
                             f"little for {image_bytes} bytes of images")
    for disk, role in zip(disks, ("primary", "mirror"), strict=True):
        gateway.cli("disks", "adopt", disk.label, "--role", role)
    print(f"disks {', '.join(f'{d.label} ({d.device}, {size / 2**20:.0f} MiB)' for d in disks)} adopted",
          file=sys.stderr)
    return Bench(gateway, disks, sources, image_bytes, args.drop_caches, root_disk())


def measure_all(bench: Bench, methods: tuple[str, ...], rounds: int, pause_rounds: int,
                retries: int, quiet_timeout: float, deadline: float) -> list[Run]:
    """Each method once per round, the order turning round by round, so that no method is
    always the one measured right after another's writes; disturbed runs are repeated.

    The throttled appliance run is measured in the first `pause_rounds` rounds only: it
    takes three times as long as the others, and what it adds, the sleeps, hardly
    depends on the machine's mood. After `deadline` (time.monotonic()) the run neither
    waits for quiet nor repeats anything: a busy machine must not stretch it without end."""
    runs: list[Run] = []
    for round_ in range(1, rounds + 1):
        these = [m for m in methods if m != "appliance-pause" or round_ <= pause_rounds]
        shift = (round_ - 1) % len(these)
        for method in these[shift:] + these[:shift]:
            for attempt in range(retries + 1):
                late = time.monotonic() > deadline
                result = bench.measure(method, round_, 0.0 if late else quiet_timeout)
                runs.append(result)
                status = "ok" if result.ok else f"FAILED: {result.problem}"
                extra = (f" (cp -a {result.cp_seconds_without_sync:.2f} s + sync)"
                         if result.cp_seconds_without_sync is not None else "")
                print(f"round {round_} {method:<16}{result.seconds:7.2f} s{extra} "
                      f"{result.images_per_second:7.1f} images/s  "
                      f"other CPU {result.other_cpu_seconds:.2f} s, other writes "
                      f"{result.other_written_mb:.0f} MB  {status}", file=sys.stderr)
                if not result.ok:
                    return runs
                if not result.disturbance or attempt == retries or time.monotonic() > deadline:
                    break
                result.disturbed = True
                print(f"  disturbed: {result.disturbance}; measuring again", file=sys.stderr)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="images (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="times each method is measured (default 3)")
    parser.add_argument("--quick", action="store_true", help="200 images, one round: a smoke test")
    parser.add_argument("--pause-rounds", type=int, default=1,
                        help=f"how many rounds also measure the default pause_ms {DEFAULT_PAUSE_MS:g} "
                             "(default 1)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "work" / "disks",
                        help="data_dir, disk images and mount points (removed at the end)")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache", help="synthetic images cache")
    parser.add_argument("--output", type=Path, default=RESULTS / "disks.json", help="results as JSON")
    parser.add_argument("--drop-caches", choices=("files", "global"), default="files",
                        help="before each run evict only the archive's files from the page cache (default), "
                             "or everything (sync; echo 3 > /proc/sys/vm/drop_caches)")
    parser.add_argument("--quiet-timeout", type=float, default=120.0,
                        help="before each run, wait up to this many seconds for idle CPUs (default 120)")
    parser.add_argument("--retries", type=int, default=2,
                        help=f"measure a run again (up to this many times) when other processes kept over "
                             f"{DISTURBED_CPUS} CPUs busy during it or wrote over {DISTURBED_WRITE_MB:g} MB "
                             "(default 2)")
    parser.add_argument("--budget", type=float, default=270.0,
                        help="seconds after which the run stops waiting for quiet and repeating disturbed "
                             "runs (default 270: a full run ends within ~6 min however busy the machine)")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, sample one more appliance copy with py-spy; print its steps")
    parser.add_argument("--py-spy", type=Path, default=None,
                        help=f"py-spy binary (default: PATH, or {PY_SPY})")
    parser.add_argument("--launcher", type=Path, default=None,
                        help="run this script instead of `python -m appliance` for the appliance "
                             "(experiments with a patched copy path; the results then say so)")
    args = parser.parse_args(argv)
    if args.quick:  # a smoke test: do not wait minutes for a busy machine to calm down
        args.count, args.rounds = 200, 1
        args.quiet_timeout, args.retries = min(args.quiet_timeout, 15.0), min(args.retries, 1)
        args.budget = min(args.budget, 40.0)
    methods = tuple(m for m in METHODS if m in {n.strip() for n in args.methods.split(",")})
    if not methods or set(args.methods.split(",")) - set(METHODS):
        parser.error(f"--methods: choose from {','.join(METHODS)}")
    if os.geteuid() != 0:
        print("disks benchmark: needs root (losetup, mount)", file=sys.stderr)
        return 2
    # SIGTERM ends the run through the same clean-up as Ctrl-C: disks unmounted and detached.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    workdir: Path = args.workdir.resolve()
    runs: list[Run] = []
    steps: list[tuple[str, float]] = []
    bench: Bench | None = None
    failed_setup: list[str] = []

    def remove_workdir() -> None:
        """Runs last, after the disks are unmounted; a failure keeps the data_dir as evidence."""
        if failed_setup or not all(r.ok for r in runs):
            print(f"kept {workdir} (the disks are unmounted and detached)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    with contextlib.ExitStack() as stack:
        stack.callback(remove_workdir)
        try:
            bench = prepare(args, workdir, stack)
            print(f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
            runs = measure_all(bench, methods, args.rounds, args.pause_rounds, args.retries,
                               args.quiet_timeout, started + args.budget)
            if args.profile and all(r.ok for r in runs):
                py_spy = args.py_spy or Path(shutil.which("py-spy") or PY_SPY)
                steps = profile(bench, py_spy, RESULTS / "disks-profile.raw")
        except (BenchError, subprocess.TimeoutExpired) as exc:
            print(f"disks benchmark: {exc}", file=sys.stderr)
            failed_setup.append(str(exc))
            return 1
    if bench is None or not runs:
        return 1
    counted = [r for r in runs if r.ok and not r.disturbed] or runs
    summary = report(counted, args.count, bench.image_bytes, args.rounds, args.pause_rounds)
    if steps:
        print("\nWhere `appliance disks copy` spends its time (py-spy, wall clock, share of samples):")
        for step, share in steps[:18]:
            print(f"  {100 * share:5.1f} %  {step}")
    document = {
        "benchmark": "disks",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": receive.machine_description(),
        "filesystem": receive.filesystem(RESULTS),
        "appliance_revision": receive.appliance_revision(),
        "launcher": str(args.launcher) if args.launcher else None,
        "load_average_at_start": load_at_start,
        "images": args.count,
        "image_bytes_total": bench.image_bytes,
        "disk_bytes": disk_size(bench.image_bytes),
        "drop_caches": args.drop_caches,
        "pause_ms_default": DEFAULT_PAUSE_MS,
        "rounds": args.rounds,
        "pause_rounds": args.pause_rounds,
        "runs": [{**asdict(r), "other_written_mb": r.other_written_mb} for r in runs],
        "disturbed_cpus_threshold": DISTURBED_CPUS,
        "disturbed_write_mb_threshold": DISTURBED_WRITE_MB,
        **summary,
        "profile": [{"step": s, "share": round(v, 4)} for s, v in steps],
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {args.output} ({document['elapsed_seconds']} s in all)")
    failed = [r for r in runs if not r.ok]
    for failure in failed:
        print(f"FAILED: round {failure.round} {failure.method}: {failure.problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
