"""The forwarder: one worker per destination, sending a study at a time.

Two kinds of trouble, treated differently, because clinics suffer both:

- **The destination refuses an object** (a DIMSE failure status, or no
  presentation context accepted for its SOP class in any syntax proposed:
  a private class, a lossy image for a lossless-only viewer): that job is
  retried with backoff a few times, then marked failed with the reason, and
  one ERROR names the destination, the object, its SOP class and what was
  proposed; the other objects keep flowing. The destination stays
  reachable: it answered.
- **The destination cannot be reached** (down over a weekend, cable out,
  the connection refused or the association rejected):
  nothing is marked failed and no attempt is counted. The worker stops
  sending, checks the destination with C-ECHO at exponential intervals
  (with jitter, capped at [forward] max_backoff_seconds), and resumes at
  once when the echo succeeds: no retry storm, nothing lost.

A C-ECHO every `echo_interval` while idle keeps the destination's health
on the status page current.

When to send is the destination's choice: at once (the default), only
within its `window` ("22:00-06:00" for a remote site on a thin line: jobs
wait, health checks go on), or once a study is stable (no new image of it
for `stable_seconds`, so a study goes in one association rather than one
per image as it trickles in).

A third kind is ours: **no syntax the destination accepted can carry the
object** (the check refuses the conversion: a corrupt stored stream, a
result that is not the source; or the syntax cannot hold the image: 16-bit
data for a JPEG-Baseline-only viewer, or a destination that takes only Big
Endian, which is never produced). The object is sent in another accepted
syntax when one works; when none does, that job alone is marked failed at
once (the same syntaxes would fail again), with the reasons. One WARNING
names the object and the reasons; refusals by the check are counted for
/metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from appliance.config import DestinationSettings, ForwardSettings
from appliance.dicom.scu import Destination, SendResult, StoreSender, c_echo
from appliance.disks.window import in_window
from appliance.forward.queue import SUCCESS_STATUSES, ForwardQueue, Job, backoff
from appliance.transcode.convert import Quality
from appliance.transcode.errors import one_line
from appliance.transcode.refusals import report_refusal
from appliance.transcode.syntaxes import name_of

log = logging.getLogger("appliance.forward")


# How often an idle worker looks for new jobs: a read of the index, no lock taken.
# 0.5 s made a lone image wait 233 ms on average before leaving; 0.1 s costs
# ten small reads a second per worker (docs/PERFORMANCE.md, forwarding).
IDLE_POLL_SECONDS = 0.1


class DestinationWorker(threading.Thread):
    def __init__(self, destination: DestinationSettings, forward: ForwardSettings, queue: ForwardQueue,
                 data_dir: Path, calling_ae: str, quality: Quality, stopping: threading.Event,
                 number: int = 1, min_psnr: float | None = None) -> None:
        super().__init__(name=f"forward-{destination.name}-{number}", daemon=True)
        self.number = number
        self.destination = destination
        self.forward = forward
        self.queue = queue
        self.data_dir = data_dir
        self.calling_ae = calling_ae
        self.sender = StoreSender(calling_ae, quality, min_psnr=min_psnr)
        self.target = Destination(destination.ae_title, destination.host, destination.port,
                                  destination.accepts)
        self.stopping = stopping
        self.last_echo = 0.0
        self.sent = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.step()
            except Exception:  # a bug must not stop forwarding for good
                log.exception("forwarder for %s: unexpected error; retrying in 5 s", self.destination.name)
                busy = False
                self.stopping.wait(5)
            if not busy:
                self.stopping.wait(IDLE_POLL_SECONDS)

    def step(self) -> bool:
        """One round: health when needed, else one study. True when work was done."""
        name = self.destination.name
        state = self.queue.destination(name)
        now = time.time()
        if state["paused"]:
            return False
        if not state["reachable"]:
            if now < state["next_try_at"]:
                return False
            return self._check_health(state)
        jobs = (self.queue.claim_study(name, self.forward.batch_size, self.destination.stable_seconds)
                if in_window(self.destination.window) else [])  # outside its window: health only
        if not jobs:
            if self.number == 1 and now - self.last_echo > self.destination.echo_interval:
                self._check_health(state)
            return False
        self._send(jobs, state)
        return True

    def _check_health(self, state: dict) -> bool:
        self.last_echo = time.time()
        problem = c_echo(self.calling_ae, self.target)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        if problem is None:
            if not state["reachable"]:
                log.warning("%s is reachable again: resuming", self.destination.name)
            self.queue.set_destination(self.destination.name, reachable=1, failures=0, next_try_at=0,
                                       last_echo_at=stamp, last_error="")
            return True
        self._unreachable(state, problem)
        return False

    def _unreachable(self, state: dict, problem: str) -> None:
        failures = state["failures"] + 1
        wait = backoff(failures, self.forward.first_backoff_seconds, self.forward.max_backoff_seconds)
        if state["reachable"]:
            log.error("%s (%s@%s:%d) cannot be reached: %s; objects stay queued, next try in %.0f s",
                      self.destination.name, self.destination.ae_title, self.destination.host,
                      self.destination.port, problem, wait)
        self.queue.set_destination(self.destination.name, reachable=0, failures=failures,
                                   next_try_at=time.time() + wait, last_error=problem[:200],
                                   last_echo_at=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def _send(self, jobs: list[Job], state: dict) -> None:
        present = [job for job in jobs if job.path is not None and (self.data_dir / job.path).is_file()]
        for job in jobs:
            if job not in present:  # replaced by a derived instance, or purged
                self.queue.done(job, "instance no longer in the archive")
        if not present:
            return
        paths = [self.data_dir / job.path for job in present]
        self.queue.count_connect(self.destination.name)
        try:
            results = self.sender.send(paths, self.target)
        except (ConnectionError, OSError, RuntimeError) as exc:
            self.queue.release(present, str(exc))
            self._unreachable(state, str(exc))
            return
        except Exception as exc:  # not the network: a batch we cannot send at all
            log.exception("%s: cannot send a batch of %d", self.destination.name, len(present))
            for job in present:  # retried with backoff, then failed and visible in the queue
                self.queue.refused(job, f"cannot send: {exc}"[:200], self.forward.max_attempts,
                                   self.forward.first_backoff_seconds, self.forward.max_backoff_seconds)
            return
        lost: list[Job] = []
        for job, result in zip(present, results, strict=True):
            if result.status is None and result.unsendable:  # no accepted syntax can carry it
                self._unsendable(job, result)
            elif result.refused:
                self._report_refusal(job, result)
            if result.status is None and result.unsendable:
                self.queue.refused(job, f"not sent: {result.detail}"[:200], 0, 0, 0)
            elif result.status in SUCCESS_STATUSES:
                self.queue.done(job, f"0x{result.status:04X}")
                self.sent += 1
            elif result.status is None and "association lost" in result.detail:
                lost.append(job)
            else:
                self._refused(job, result)
        if lost:
            self.queue.release(lost, "association lost")
            self._unreachable(state, "association lost while sending")

    def _refused(self, job: Job, result: SendResult) -> None:
        """Retried with backoff, failed after max_attempts with one ERROR saying why."""
        if result.status is not None:
            what = f"{name_of(result.sop_class)} " if result.sop_class else ""
            reason = f"status 0x{result.status:04X} ({what}sent as {name_of(result.transfer_syntax)})"
        else:
            reason = result.detail
        outcome = self.queue.refused(job, reason[:200], self.forward.max_attempts,
                                     self.forward.first_backoff_seconds, self.forward.max_backoff_seconds)
        if outcome == "failed":
            log.error("%s (%s) did not take %s after %d attempts: %s; job %d marked failed: fix the cause, "
                      "then `appliance queue retry %d` (or `appliance queue drop %d`)", self.destination.name,
                      self.destination.ae_title, one_line(job.sop_instance_uid, 80), job.attempts + 1,
                      one_line(reason), job.id, job.id, job.id)
        else:
            log.info("%s did not take %s (attempt %d of %d): %s; the rest of the queue goes on",
                     self.destination.name, one_line(job.sop_instance_uid, 80), job.attempts + 1,
                     self.forward.max_attempts, one_line(reason))

    def _unsendable(self, job: Job, result) -> None:
        """Failed at once (the same syntaxes would fail again): one WARNING with the reasons."""
        outcome = (f"not sent, job {job.id} marked failed (`appliance queue retry {job.id}` once the "
                   "cause is fixed)")
        if result.refused:
            self._report_refusal(job, result, outcome)
        else:
            log.warning("%s: not sent to %s, job %d marked failed (`appliance queue retry %d` once the "
                        "cause is fixed): %s", one_line(job.sop_instance_uid, 80), self.destination.name,
                        job.id, job.id, one_line(result.detail))

    def _report_refusal(self, job: Job, result, outcome: str = "") -> None:
        """One WARNING and one counted refusal per object, whatever number of syntaxes failed."""
        outcome = outcome or f"sent as {name_of(result.transfer_syntax)} instead"
        reason = "; ".join(f"{name_of(syntax)}: {why}" for syntax, why in result.refused)
        report_refusal(log, self.queue.index, job.sop_instance_uid, result.refused[0][0],
                       f"forward to {self.destination.name}", reason, outcome)


class Forwarder:
    def __init__(self, settings, queue: ForwardQueue) -> None:
        self.stopping = threading.Event()
        quality = Quality(settings.storage.lossy_quality)
        # [destination] max_associations workers each: they claim different
        # studies (claims are transactions), so a destination never gets more
        # associations from us than it was promised.
        self.workers = [
            DestinationWorker(d, settings.forward, queue, settings.data_dir, settings.node.ae_title,
                              quality, self.stopping, number, settings.storage.lossy_min_psnr)
            for d in settings.destinations
            for number in range(1, d.max_associations + 1)
        ]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        for worker in self.workers:
            worker.join(timeout)
