"""Where the appliance's receive time goes: py-spy on `appliance dicom` during a storescu send.

    .venv/bin/python bench/profile_receive.py --py-spy /path/to/py-spy [--count 1000]

The receive benchmark says how fast; this says why. py-spy samples every
thread of the running service (wall clock, idle included, so fsync waits
count) while storescu sends the synthetic CT series over one association,
and the samples of the thread that runs the C-STORE handler are grouped by
what the handler is doing: waiting for the next dataset (pynetdicom receiving
it), parsing the header, hashing, fsyncing, committing the index.

storescu waits for each response before sending the next image, so the
handler thread's timeline IS the per-image latency: its shares, multiplied
by the seconds per image, give milliseconds per image for each step.

py-spy is not a dependency of the project: `pip install py-spy` into any
environment (or unpack its wheel) and pass the binary with --py-spy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import machine
import peers
import synthetic

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# (label, every substring that must occur in the stack), first match wins; the
# order goes from the most specific frame to the most general.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("fsync of the directories (move_durable)", ("move_durable", "fsync_path")),
    ("rename and directory checks (move_durable)", ("move_durable",)),
    ("SQLite commit (WAL fsync)", ("Index.transaction",)),
    ("SQLite statements (upsert, lookup)", ("Index.",)),
    ("sha256 of file and dataset", ("_digests",)),
    ("structure walk (check_part10)", ("check_part10",)),
    ("header parse: pydicom Dataset.decode()", ("read_record", "Dataset.decode")),
    ("header parse: pydicom dcmread and record", ("read_record",)),
    # (the fsync of the received file is matched by its line: see fsync_frame())
    ("instance lock (flock)", ("_instance_lock",)),
    ("other archive work (stat, free space, layout)", ("ingest_file",)),
    ("handler outside the archive", ("_on_store",)),
    ("pynetdicom: response, DIMSE bookkeeping", ("_serve_request",)),
    ("waiting for the next dataset (pynetdicom receiving it, storescu sending it)", ("_run_reactor",)),
]


def find_py_spy(given: str | None) -> str:
    candidate = given or shutil.which("py-spy")
    if not candidate or not os.access(candidate, os.X_OK):
        raise SystemExit("py-spy not found: `pip install py-spy` somewhere and pass --py-spy PATH")
    return candidate


def fsync_frame() -> str | None:
    """py-spy's name for the line of ingest_file that fsyncs the received file.

    A C call has no frame of its own, so the fsync shows as that line of
    ingest_file; the line is looked up in the source, which others edit.
    """
    source = peers.REPO / "appliance" / "archive" / "ingest.py"
    inside = False
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("def "):
            inside = line.lstrip().startswith("def ingest_file(")
        elif inside and "os.fsync(" in line:
            return f"ingest_file (appliance/archive/ingest.py:{number})"
    return None


FSYNC_FRAME = fsync_frame()


def classify(stack: str) -> str:
    if FSYNC_FRAME and stack.endswith(FSYNC_FRAME):
        return "fsync of the received file"
    for label, needles in CATEGORIES:
        if all(needle in stack for needle in needles):
            return label
    return "other"


def handler_thread_samples(raw: Path) -> Counter[str]:
    """Samples of the thread that ran the C-STORE handler, by category.

    py-spy's raw format is one collapsed stack per line: frames joined by ';'
    (the first names the thread), then a space and the sample count.
    """
    by_thread: dict[str, Counter[str]] = {}
    handler_threads: set[str] = set()
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread = stack.split(";", 1)[0]
        by_thread.setdefault(thread, Counter())[classify(stack)] += int(count)
        if "_on_store" in stack:
            handler_threads.add(thread)
    handlers = [by_thread[t] for t in handler_threads]
    if not handlers:
        raise SystemExit(f"no C-STORE handler thread in {raw}; did the send reach the appliance?")
    return max(handlers, key=lambda c: c.total())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--py-spy", dest="py_spy", help="the py-spy binary (default: from PATH)")
    parser.add_argument("--count", type=int, default=1000, help="images to send (default 1000)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "work")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache")
    parser.add_argument("--output", type=Path, default=RESULTS / "profile-receive.txt",
                        help="py-spy's raw collapsed stacks, for flame graphs")
    args = parser.parse_args(argv)
    py_spy = find_py_spy(args.py_spy)

    files = synthetic.cached(synthetic.CTSpec(count=args.count), args.cache)
    appliance = peers.Appliance(workdir=args.workdir / "profile-appliance")
    appliance.start()
    try:
        os.sync()
        machine.wait_for_quiet(appliance.pid)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            [py_spy, "record", "--threads", "--idle", "--rate", str(args.rate), "--format", "raw",
             "--output", str(args.output), "--pid", str(appliance.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # let py-spy attach before the first image arrives
        sent = peers.storescu(appliance.port, files, called_aet=appliance.aet)
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        stored = appliance.stored_count()
    finally:
        appliance.stop()
    if sent.returncode != 0 or stored != len(files):
        print(f"send failed: storescu exited {sent.returncode}, appliance holds {stored} of {len(files)}",
              file=sys.stderr)
        return 1
    appliance.cleanup()

    per_image_ms = 1000 * sent.seconds / len(files)
    samples = handler_thread_samples(args.output)
    total = samples.total()
    print(f"{len(files)} images in {sent.seconds:.2f} s: {len(files) / sent.seconds:.1f} images/s, "
          f"{per_image_ms:.2f} ms per image (py-spy attached: a little slower than the benchmark)")
    print(f"C-STORE handler thread, {total} samples, wall clock:\n")
    print(f"{'share':>6} {'ms/image':>9}  step")
    for label, count in samples.most_common():
        print(f"{100 * count / total:5.1f}% {per_image_ms * count / total:9.2f}  {label}")
    print(f"\nraw stacks: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
