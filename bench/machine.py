"""Readings of this machine from /proc: a process's memory and CPU, and everyone else's.

Benchmarks report a peer's peak RSS and CPU time next to its rate, and must
know when something else was using the machine: on a shared 2-core box a
test suite running beside the benchmark slows every peer, and the results
should say so (or measure again) rather than hide it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path


def proc_status_kb(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmHWM = peak RSS, VmRSS = now), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by the process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields after the ")" start at field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / ticks


def machine_busy_seconds() -> float:
    """CPU seconds all processes and the kernel spent busy so far, summed over CPUs.

    Interrupt time is left out (loopback TCP work lands there for every peer
    alike); kernel threads are subtracted by `other_cpu_seconds`.
    """
    fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]
    user, nice, system = int(fields[0]), int(fields[1]), int(fields[2])
    steal = int(fields[7])
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def kernel_threads_cpu_seconds() -> float:
    """CPU seconds used so far by kernel threads (writeback, ext4 journal, block I/O workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="ascii", errors="replace").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == 2 or ppid == 2:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class MachineSample:
    """A reading of the whole machine's CPU use, to tell later what else was running."""

    busy: float = field(default_factory=machine_busy_seconds)
    kernel_threads: float = field(default_factory=kernel_threads_cpu_seconds)
    own: float = field(default_factory=lambda: sum(os.times()[:2]))


def other_cpu_seconds(before: MachineSample, after: MachineSample, accounted: float) -> tuple[float, float]:
    """(other processes, kernel threads) CPU seconds between two samples.

    `accounted` is the CPU time of the processes being measured (the peer,
    storescu). What remains, less this process and kernel threads, is other
    work sharing the machine: on a 2-core box a test suite running beside
    the benchmark slows every peer, and the results should say so. Kernel
    thread time is reported apart: it is mostly the peers' own fsyncs.
    """
    kernel = max(0.0, after.kernel_threads - before.kernel_threads)  # exiting kworkers lower the sum
    own = after.own - before.own
    other = after.busy - before.busy - kernel - own - accounted
    return max(0.0, other), kernel


def wait_for_quiet(pid: int | None = None, *, threshold: float = 0.25, window: float = 1.0,
                   timeout: float = 120.0) -> tuple[float, float]:
    """Wait until other work uses under `threshold` CPUs for `window` seconds.

    On a shared 2-core machine another session's test suite can take a whole
    core for minutes; a send measured then tells more about that suite than
    about the peer. `pid` (the idle peer) is not counted as other work.
    Returns (seconds waited, CPUs busy in the last window); after `timeout`
    it gives up and returns the last reading, for the result to show.
    """
    started = time.monotonic()
    while True:
        peer_before = cpu_seconds(pid) if pid else 0.0
        before = MachineSample()
        time.sleep(window)
        after = MachineSample()
        peer_after = cpu_seconds(pid) if pid else 0.0
        other, _kernel = other_cpu_seconds(before, after, (peer_after or 0.0) - (peer_before or 0.0))
        busy = other / window
        waited = time.monotonic() - started
        if busy < threshold or waited >= timeout:
            return waited, busy
