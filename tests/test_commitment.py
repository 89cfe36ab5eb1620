"""Storage Commitment Push Model with pynetdicom as the modality, and requests nobody serves.

The gateway runs as `appliance dicom`; the requester stores a few CT images
with storescu, then asks for commitment of those and of one never sent. The
report must list as committed exactly what the archive holds intact.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StudyRootQueryRetrieveInformationModelFind

from tests.conftest import (
    ApplianceProcess,
    free_port,
    run_cli,
    storescu,
    synthetic_ct,
    wait_for,
    write_config,
)

INSTANCE = "1.2.840.10008.1.20.1.1"


def gateway(make_appliance, extra: str) -> ApplianceProcess:
    proc = make_appliance(start=False)
    with open(proc.config, "a", encoding="utf-8") as fp:
        fp.write("\n" + extra + "\n")
    proc.start()
    return proc


def stored(proc: ApplianceProcess, tmp_path: Path, count: int) -> list[tuple[str, str]]:
    """Store `count` CT images with storescu; their (SOP Class, SOP Instance) pairs."""
    files = synthetic_ct(tmp_path / "in", count)
    storescu(proc.port, files, aet="MODALITY")
    pairs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in map(pydicom.dcmread, files)]
    assert len(proc.find()) == count
    return pairs


def action(pairs: list[tuple[str, str]], transaction: str) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def report_lists(info: Dataset) -> tuple[set[str], dict[str, int]]:
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
              for i in info.get("FailedSOPSequence", [])}
    return committed, failed


def requester() -> AE:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(StorageCommitmentPushModel)
    return ae


def catch(reports: list, done: threading.Event):
    def handler(event) -> int:
        reports.append((event.event_type, event.event_information))
        done.set()
        return 0x0000, None
    return handler


def test_commitment_report_on_the_same_association(make_appliance, tmp_path: Path) -> None:
    proc = gateway(make_appliance, '[[peer]]\nae_title = "MODALITY"\nservices = ["store", "commitment"]\n'
                   '[[peer]]\nae_title = "PROBE"\nservices = []\n')
    pairs = stored(proc, tmp_path, 2)
    never = (CTImageStorage, generate_uid())
    reports: list = []
    done = threading.Event()
    ae = requester()
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="GATEWAY",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, catch(reports, done))])
    assert assoc.is_established
    transaction = generate_uid()
    status, _ = assoc.send_n_action(action([*pairs, never], transaction), 1, StorageCommitmentPushModel,
                                    INSTANCE)
    assert status.Status == 0x0000
    assert done.wait(10), "no N-EVENT-REPORT on the same association"
    wait_for(lambda: _transactions(proc)[transaction] == "delivered", 10, "the transaction delivered")
    assoc.release()
    event_type, info = reports[0]
    committed, failed = report_lists(info)
    assert event_type == 2 and info.TransactionUID == transaction
    assert committed == {uid for _, uid in pairs}
    assert failed == {never[1]: 0x0112}


def test_an_altered_file_is_not_committed(make_appliance, tmp_path: Path) -> None:
    proc = gateway(make_appliance, "")
    pairs = stored(proc, tmp_path, 2)
    altered = proc.find()[0]
    path = proc.data_dir / altered["path"]
    path.write_bytes(path.read_bytes()[:-2] + b"\0\1")
    reports: list = []
    done = threading.Event()
    assoc = requester().associate("127.0.0.1", proc.port, ae_title="GATEWAY",
                                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, catch(reports, done))])
    transaction = generate_uid()
    assoc.send_n_action(action(pairs, transaction), 1, StorageCommitmentPushModel, INSTANCE)
    assert done.wait(10)
    wait_for(lambda: _transactions(proc)[transaction] == "delivered", 10, "the transaction delivered")
    assoc.release()
    committed, failed = report_lists(reports[0][1])
    assert failed == {altered["sop_instance_uid"]: 0x0110}
    assert committed == {uid for _, uid in pairs} - {altered["sop_instance_uid"]}


def test_report_on_a_new_association_when_the_requester_released(make_appliance, tmp_path: Path) -> None:
    listen = free_port()
    proc = gateway(make_appliance, '[[peer]]\nae_title = "MODALITY"\naddress = "127.0.0.1"\n'
                   f'port = {listen}\nservices = ["store", "commitment"]\n'
                   '[[peer]]\nae_title = "PROBE"\nservices = []\n')
    pairs = stored(proc, tmp_path, 1)
    never = (CTImageStorage, generate_uid())
    reports: list = []
    done = threading.Event()
    scp = AE(ae_title="MODALITY")
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = scp.start_server(("127.0.0.1", listen), block=False,
                              evt_handlers=[(evt.EVT_N_EVENT_REPORT, catch(reports, done))])
    try:
        ae = requester()
        assoc = ae.associate("127.0.0.1", proc.port, ae_title="GATEWAY",
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: (0x0110, None))])
        transaction = generate_uid()
        status, _ = assoc.send_n_action(action([*pairs, never], transaction), 1,
                                        StorageCommitmentPushModel, INSTANCE)
        assert status.Status == 0x0000
        assoc.release()
        assert done.wait(30), f"no report on a new association:\n{proc.log()}"
    finally:
        server.shutdown()
    event_type, info = reports[0]
    assert event_type == 2 and info.TransactionUID == transaction
    assert report_lists(info) == ({pairs[0][1]}, {never[1]: 0x0112})
    wait_for(lambda: _transactions(proc)[transaction] == "delivered", 10, "the transaction delivered")


def test_an_unserved_query_model_is_refused_and_bad_n_actions_keep_the_association(make_appliance) -> None:
    proc = gateway(make_appliance, "")
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="GATEWAY")
    assert assoc.is_established
    find = [cx for cx in assoc.rejected_contexts
            if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind]
    assert find, "a query model nobody serves must not be accepted"
    # an N-ACTION of an unknown type on the accepted context: refused, the association stays
    status, _ = assoc.send_n_action(action([], generate_uid()), 7, StorageCommitmentPushModel, INSTANCE)
    assert status.Status == 0x0123
    status, _ = assoc.send_n_action(action([], generate_uid()), 1, StorageCommitmentPushModel, "1.2.3.4")
    assert status.Status == 0x0112  # only the well-known instance exists
    assert assoc.is_established
    assoc.release()


def _transactions(proc: ApplianceProcess) -> dict[str, str]:
    with sqlite3.connect(proc.data_dir / "index.sqlite") as conn:
        return dict(conn.execute("SELECT transaction_uid, state FROM commitment_transactions"))



@pytest.mark.root  # loop-mounted ext4 disks
def test_two_disks_commits_only_what_has_two_verified_copies(tmp_path: Path, loop_disks) -> None:
    from tests.test_disk_proof import import_images, pair

    port = free_port()
    data = tmp_path / "data"
    config = write_config(tmp_path / "gw.toml", {"dicom_port": port, "data_dir": str(data), "min_free_mb": 1,
                                                 "bind_address": "127.0.0.1"})
    with open(config, "a", encoding="utf-8") as fp:
        fp.write('\n[storage]\ncommit_requires = "two-disks"\n[disks]\ncopy_window = "always"\n'
                 "min_free_gb = 0.005\npause_ms = 0\n")
    pair(config, lambda label, mb=40, name=None: loop_disks(name or label, mb, label=label),
         "CMT_A", "CMT_B")  # labels no other test's disks carry
    copied = import_images(config, tmp_path, 2, name="ct")
    assert "4 verified copies made" in run_cli(config, "disks", "copy").stdout
    waiting = import_images(config, tmp_path, 1, name="late")  # imported, not yet copied
    proc = ApplianceProcess(config, data, port, tmp_path / "gw.log")
    proc.start()
    try:
        pairs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                 for ds in map(pydicom.dcmread, [*copied, *waiting])]
        never = (CTImageStorage, generate_uid())
        reports: list = []
        done = threading.Event()
        assoc = requester().associate("127.0.0.1", port, ae_title="GATEWAY",
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, catch(reports, done))])
        transaction = generate_uid()
        status, _ = assoc.send_n_action(action([*pairs, never], transaction), 1,
                                        StorageCommitmentPushModel, INSTANCE)
        assert status.Status == 0x0000
        assert done.wait(10), f"no report:\n{proc.log()}"
        wait_for(lambda: _transactions(proc)[transaction] == "delivered", 10, "the transaction delivered")
        assoc.release()
    finally:
        assert proc.stop() == 0
    committed, failed = report_lists(reports[0][1])
    assert committed == {pairs[0][1], pairs[1][1]}
    assert failed == {pairs[2][1]: 0x0110, never[1]: 0x0112}


def test_an_undelivered_report_survives_a_restart(make_appliance, tmp_path: Path) -> None:
    listen = free_port()
    proc = gateway(make_appliance, '[[peer]]\nae_title = "MODALITY"\naddress = "127.0.0.1"\n'
                   f'port = {listen}\nservices = ["store", "commitment"]\n'
                   '[[peer]]\nae_title = "PROBE"\nservices = []\n')
    pairs = stored(proc, tmp_path, 1)
    assoc = requester().associate("127.0.0.1", proc.port, ae_title="GATEWAY")
    transaction = generate_uid()
    assert assoc.send_n_action(action(pairs, transaction), 1, StorageCommitmentPushModel,
                               INSTANCE)[0].Status == 0x0000
    assoc.release()  # before the report, and nobody listens on its port yet
    wait_for(lambda: "cannot associate with MODALITY" in proc.log(), 20, "a failed delivery")
    assert proc.stop() == 0
    assert _transactions(proc)[transaction] == "pending"
    reports: list = []
    done = threading.Event()
    scp = AE(ae_title="MODALITY")
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = scp.start_server(("127.0.0.1", listen), block=False,
                              evt_handlers=[(evt.EVT_N_EVENT_REPORT, catch(reports, done))])
    try:
        proc.start()
        assert done.wait(60), f"the report was not sent after the restart:\n{proc.log()}"
    finally:
        server.shutdown()
    assert reports[0][0] == 1 and report_lists(reports[0][1]) == ({pairs[0][1]}, {})
    wait_for(lambda: _transactions(proc)[transaction] == "delivered", 10, "the transaction delivered")
