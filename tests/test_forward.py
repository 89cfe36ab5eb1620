"""Store-and-forward with real peers: Orthanc, DCMTK storescp, and a pynetdicom SCP that refuses."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from tests.conftest import (
    REPO,
    STORESCP,
    TEST_FILES,
    dcmtk_env,
    echo,
    free_port,
    storescu,
    synthetic_ct,
    wait_for,
)

sys.path.insert(0, str(REPO / "bench"))  # the benchmarks' peer helpers, reused here
from peers import Orthanc


def _destination(name: str, ae: str, port: int, accepts: str = '["uncompressed"]', extra: str = "") -> str:
    return (f'\n[[destination]]\nname = "{name}"\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
            f"accepts = {accepts}\n{extra}")


def _gateway(make_appliance, destinations: str, forward: str = "") -> object:
    gateway = make_appliance(start=False)
    with open(gateway.config, "a", encoding="utf-8") as fp:
        fp.write(f"\n[forward]\nfirst_backoff_seconds = 0.5\nmax_backoff_seconds = 2\n{forward}\n")
        fp.write(destinations)
    gateway.start()
    return gateway


class Forwarder:
    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.log = gateway.data_dir.parent / f"forward-{gateway.port}.log"
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance", "--config", str(self.gateway.config), "forward"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=60) == 0, self.text()

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _jobs(gateway, *args: str) -> list[dict]:
    out = gateway.cli("queue", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def orthanc(tmp_path: Path):
    peers = []

    def start(port: int | None = None) -> Orthanc:
        peer = Orthanc(workdir=tmp_path / f"orthanc{len(peers)}", **({"port": port} if port else {}))
        peer.start()
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.stop()


def _orthanc_instances(peer: Orthanc) -> dict[str, pydicom.Dataset]:
    found = {}
    for instance_id in peer.rest("/instances"):
        url = f"http://127.0.0.1:{peer.http_port}/instances/{instance_id}/file"
        with urllib.request.urlopen(url, timeout=10) as response:
            ds = pydicom.dcmread(io.BytesIO(response.read()))
        found[ds.SOPInstanceUID] = ds
    return found


def test_orthanc_receives_everything_with_equal_pixels(make_appliance, orthanc, tmp_path: Path) -> None:
    pacs = orthanc()
    gateway = _gateway(make_appliance, _destination("pacs", "ORTHANC", pacs.port))
    files = [*synthetic_ct(tmp_path / "ct", 20, size=128), TEST_FILES / "MR_small.dcm"]
    assert storescu(gateway.port, files).returncode == 0
    assert storescu(gateway.port, [TEST_FILES / "SC_rgb_rle.dcm"], "-xr").returncode == 0
    forwarder = Forwarder(gateway)
    try:
        wait_for(lambda: pacs.stored_count() == 22, 60, "22 instances at Orthanc")
    finally:
        forwarder.stop()
    received = _orthanc_instances(pacs)
    for path in [*files, TEST_FILES / "SC_rgb_rle.dcm"]:
        source = pydicom.dcmread(path)
        assert np.array_equal(received[source.SOPInstanceUID].pixel_array, source.pixel_array)
    jobs = _jobs(gateway)
    assert len(jobs) == 22 and {j["state"] for j in jobs} == {"done"}


def test_routing_rules(make_appliance, orthanc, tmp_path: Path) -> None:
    pacs = orthanc()
    only_mr = _destination("pacs", "ORTHANC", pacs.port, extra='match = { modality = ["MR"] }')
    gateway = _gateway(make_appliance, only_mr)
    sources = [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"]
    assert storescu(gateway.port, sources).returncode == 0
    mr = pydicom.dcmread(TEST_FILES / "MR_small.dcm").SOPInstanceUID
    assert [j["sop_instance_uid"] for j in _jobs(gateway)] == [mr]


def test_implicit_only_destination_still_gets_every_image(make_appliance, tmp_path: Path) -> None:
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen([STORESCP, "+xi", "-aet", "OLDPACS", "-od", str(out), str(port)], env=dcmtk_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: echo(port, aec="OLDPACS") == 0, 10, "storescp")
        gateway = _gateway(make_appliance, _destination("old", "OLDPACS", port, '["lossless"]'))
        sources = [("MR_small_jp2klossless.dcm", "-xv"), ("SC_rgb_rle.dcm", "-xr"), ("CT_small.dcm", "-xe")]
        for name, option in sources:
            assert storescu(gateway.port, [TEST_FILES / name], option).returncode == 0
        forwarder = Forwarder(gateway)
        try:
            wait_for(lambda: len(list(out.iterdir())) == 3, 60, "3 files at storescp")
        finally:
            forwarder.stop()
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    for path in out.iterdir():
        got = pydicom.dcmread(path)
        assert got.file_meta.TransferSyntaxUID == uid.ImplicitVRLittleEndian
        source = next(pydicom.dcmread(TEST_FILES / n) for n, _ in sources
                      if pydicom.dcmread(TEST_FILES / n).SOPInstanceUID == got.SOPInstanceUID)
        assert np.array_equal(got.pixel_array, source.pixel_array)


def test_outage_loses_nothing_and_does_not_hammer(make_appliance, orthanc, tmp_path: Path) -> None:
    port = free_port()
    gateway = _gateway(make_appliance, _destination("pacs", "ORTHANC", port))
    files = synthetic_ct(tmp_path / "ct", 300, size=64)
    forwarder = Forwarder(gateway)
    try:
        assert storescu(gateway.port, files).returncode == 0
        outage = time.monotonic()
        time.sleep(6)
        jobs = _jobs(gateway)
        assert len(jobs) == 300 and {j["state"] for j in jobs} == {"pending"}, "no failed marks"
        index = sqlite3.connect(gateway.data_dir / "index.sqlite")
        failures = index.execute("SELECT failures FROM destination_state WHERE name='pacs'").fetchone()[0]
        elapsed = time.monotonic() - outage
        # Backoff 0.5 s doubling to 2 s: a handful of checks, not one per image or per loop.
        assert 2 <= failures <= 3 + elapsed / 1.6, failures
        assert "cannot be reached" in forwarder.text()
        assert forwarder.text().count("cannot be reached") == 1, "one ERROR per outage, not per try"
        pacs = orthanc(port)
        wait_for(lambda: pacs.stored_count() == 300, 90, "300 instances after the outage")
        jobs = _jobs(gateway)
        assert {j["state"] for j in jobs} == {"done"} and not [j for j in jobs if j["attempts"]]
        assert "reachable again" in forwarder.text()
    finally:
        forwarder.stop()


def test_kill9_mid_study_loses_nothing(make_appliance, orthanc, tmp_path: Path) -> None:
    pacs = orthanc()
    gateway = _gateway(make_appliance, _destination("pacs", "ORTHANC", pacs.port),
                       forward="batch_size = 400")
    files = synthetic_ct(tmp_path / "ct", 400, size=128)
    assert storescu(gateway.port, files).returncode == 0
    forwarder = Forwarder(gateway)
    wait_for(lambda: pacs.stored_count() >= 40, 60, "the study under way")
    forwarder.kill9()
    before = pacs.stored_count()
    assert before < 400, "the kill must land mid-study"
    forwarder.start()
    try:
        wait_for(lambda: pacs.stored_count() == 400, 90, "all 400 after the restart")
    finally:
        forwarder.stop()
    jobs = _jobs(gateway)
    assert {j["state"] for j in jobs} == {"done"}
    assert sum(j["possible_duplicates"] for j in jobs) >= 1, "resent objects are counted"


class RefusingSCP:
    """A pynetdicom storage SCP that refuses one SOP Instance UID until told otherwise."""

    def __init__(self, refuse_uid: str) -> None:
        self.refuse_uid = refuse_uid
        self.refusing = True
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PICKY")
        for cls in (CTImageStorage, MRImageStorage, Verification):
            ae.add_supported_context(cls, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.lock = threading.Lock()

    def on_store(self, event: evt.Event) -> int:
        sop = event.request.AffectedSOPInstanceUID
        if self.refusing and sop == self.refuse_uid:
            return 0xC123
        with self.lock:
            self.received.append(sop)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_refused_object_fails_alone_and_retry_sends_it(make_appliance, tmp_path: Path) -> None:
    files = synthetic_ct(tmp_path / "ct", 5, size=64)
    bad = pydicom.dcmread(files[2]).SOPInstanceUID
    scp = RefusingSCP(bad)
    gateway = _gateway(make_appliance, _destination("picky", "PICKY", scp.port), forward="max_attempts = 2")
    forwarder = Forwarder(gateway)
    try:
        assert storescu(gateway.port, files).returncode == 0
        failed = wait_for(lambda: _jobs(gateway, "--state", "failed"), 30, "the refused job to fail")
        assert [j["sop_instance_uid"] for j in failed] == [bad]
        why = "status 0xC123 (CT Image Storage sent as Explicit VR Little Endian)"
        assert failed[0]["last_status"] == why and failed[0]["attempts"] == 2
        assert len(scp.received) == 4, "the other objects went through"
        text = gateway.cli("queue", "--state", "failed").stdout
        assert f"failed after 2 attempt(s): {why}" in text
        (error,) = [line for line in forwarder.text().splitlines() if " ERROR " in line]
        assert "marked failed" in error and bad in error and why in error
        scp.refusing = False
        assert "1 job(s) queued again" in gateway.cli("queue", "retry", "--all").stdout
        wait_for(lambda: bad in scp.received, 30, "the retried object")
        assert {j["state"] for j in _jobs(gateway)} == {"done"}
    finally:
        forwarder.stop()
        scp.stop()


def test_pause_resume_and_send_again(make_appliance, orthanc, tmp_path: Path) -> None:
    pacs = orthanc()
    gateway = _gateway(make_appliance, _destination("pacs", "ORTHANC", pacs.port))
    assert "pacs: paused" in gateway.cli("queue", "pause", "pacs").stdout
    forwarder = Forwarder(gateway)
    try:
        assert storescu(gateway.port, [TEST_FILES / "CT_small.dcm"]).returncode == 0
        time.sleep(2)
        assert pacs.stored_count() == 0 and "paused" in gateway.cli("queue").stdout
        gateway.cli("queue", "resume", "pacs")
        wait_for(lambda: pacs.stored_count() == 1, 30, "the image after resume")
        result = gateway.cli("send", "--to", "pacs", "--patient-id", "1CT1")
        assert "1 image(s) queued for pacs" in result.stdout
        wait_for(lambda: _jobs(gateway)[0]["sent_count"] == 2, 30, "the image sent again")
    finally:
        forwarder.stop()
    assert gateway.cli("send", "--to", "nowhere", "--patient-id", "x", check=False).returncode == 2


def test_parallel_associations_stay_within_the_bound(make_appliance, tmp_path: Path) -> None:
    scp = RefusingSCP(refuse_uid="none")
    open_now, peak = [0], [0]
    lock = threading.Lock()

    def opened(_event: evt.Event) -> None:
        with lock:
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            time.sleep(0.2)  # hold it a little so overlapping workers show

    def closed(_event: evt.Event) -> None:
        with lock:
            open_now[0] -= 1

    scp.server.bind(evt.EVT_ESTABLISHED, opened)
    scp.server.bind(evt.EVT_RELEASED, closed)
    scp.server.bind(evt.EVT_ABORTED, closed)
    gateway = _gateway(make_appliance, _destination("picky", "PICKY", scp.port, extra="max_associations = 2"))
    studies = [synthetic_ct(tmp_path / f"s{n}", 5, size=64, patient_id=f"P{n}") for n in range(6)]
    for files in studies:
        assert storescu(gateway.port, files).returncode == 0
    forwarder = Forwarder(gateway)
    try:
        wait_for(lambda: len(scp.received) == 30, 60, "30 objects over parallel associations")
    finally:
        forwarder.stop()
        scp.stop()
    assert 1 <= peak[0] <= 2, f"{peak[0]} associations at once; the destination allows 2"


def test_damaged_archive_file_fails_alone(make_appliance, tmp_path: Path) -> None:
    files = synthetic_ct(tmp_path / "ct", 6, size=64)
    scp = RefusingSCP(refuse_uid="none")
    gateway = _gateway(make_appliance, _destination("picky", "PICKY", scp.port), forward="max_attempts = 2")
    assert storescu(gateway.port, files).returncode == 0
    damaged = gateway.find()[2]
    Path(damaged["path"]).write_bytes(b"not dicom any more")
    forwarder = Forwarder(gateway)
    try:
        failed = wait_for(lambda: _jobs(gateway, "--state", "failed"), 30, "the damaged job to fail")
        assert [j["sop_instance_uid"] for j in failed] == [damaged["sop_instance_uid"]]
        assert "unreadable archive file" in failed[0]["last_status"]
        wait_for(lambda: len(scp.received) == 5, 30, "the other five")
    finally:
        forwarder.stop()
        scp.stop()


def test_connect_count_survives_parallel_workers(tmp_path: Path) -> None:
    """Each worker of a destination counts its associations; none may be lost to a race."""
    from appliance.archive.index import Index
    from appliance.forward.queue import ForwardQueue

    queue = ForwardQueue(Index(tmp_path / "index.sqlite"))

    def connect_many() -> None:
        for _ in range(100):
            queue.count_connect("pacs")

    workers = [threading.Thread(target=connect_many) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    connects = sqlite3.connect(tmp_path / "index.sqlite").execute(
        "SELECT connects FROM destination_state WHERE name = 'pacs'").fetchone()[0]
    assert connects == 300


def test_a_conversion_the_check_refuses_fails_that_object_alone(make_appliance, tmp_path: Path) -> None:
    """A stored JPEG whose stream is corrupt, for a destination that takes only uncompressed data:
    that job fails at once with the reason, one WARNING, no traceback, counted; the rest go."""
    from tests import bad_inputs

    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(out), str(port)], env=dcmtk_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: echo(port, aec="PACS") == 0, 10, "storescp")
        gateway = _gateway(make_appliance, _destination("pacs", "PACS", port))
        corrupt = bad_inputs.save(bad_inputs.corrupt_jpeg("garbage"), tmp_path / "garbage.dcm")
        clean = bad_inputs.save(bad_inputs.jpeg_baseline(), tmp_path / "clean.dcm")
        assert storescu(gateway.port, [corrupt, clean], "-xy").returncode == 0
        forwarder = Forwarder(gateway)
        try:
            failed = wait_for(lambda: _jobs(gateway, "--state", "failed"), 30, "the corrupt job to fail")
            wait_for(lambda: len(list(out.iterdir())) == 1, 30, "the clean image at storescp")
        finally:
            forwarder.stop()
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    corrupt_uid = bad_inputs.read(corrupt).SOPInstanceUID
    assert [(j["sop_instance_uid"], j["attempts"]) for j in failed] == [(corrupt_uid, 1)], "no retries"
    assert "rejected by the decoder" in failed[0]["last_status"]
    log = forwarder.text()
    assert "Traceback" not in log
    (line,) = [line for line in log.splitlines() if corrupt_uid in line]
    assert " WARNING " in line and "not sent" in line and "queue retry" in line, line
    report = json.loads(gateway.cli("status", "--json", check=False).stdout)
    assert report["archive"]["conversions_refused"] == 1
    (got,) = [pydicom.dcmread(p) for p in out.iterdir()]
    assert got.SOPInstanceUID == bad_inputs.read(clean).SOPInstanceUID
