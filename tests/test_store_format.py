"""[storage] format: objects are acked as received, then stored in the site's format."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid

from tests.conftest import REPO, TEST_FILES, storescu, wait_for


def _append_storage(config: Path, **storage: object) -> None:
    lines = ["", "[storage]"] + [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}"
                                 for k, v in storage.items()]
    with open(config, "a", encoding="utf-8") as fp:
        fp.write("\n".join(lines) + "\n")


class _Converter:
    def __init__(self, gateway) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(gateway.config), "convert"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> str:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, out
        return out


def _gateway(make_appliance, **storage: object):
    gateway = make_appliance(start=False)
    _append_storage(gateway.config, **storage)
    gateway.start()
    return gateway


def test_lossless_store_keeps_the_uid_and_every_pixel(make_appliance) -> None:
    gateway = _gateway(make_appliance, format="lossless")
    source = TEST_FILES / "CT_small.dcm"
    assert storescu(gateway.port, [source]).returncode == 0
    (received,) = gateway.find()
    assert received["transfer_syntax_uid"] == uid.ExplicitVRLittleEndian, "acked as received"
    converter = _Converter(gateway)
    try:
        row = wait_for(lambda: [r for r in gateway.find()
                                 if r["transfer_syntax_uid"] == uid.JPEGLSLossless])[0]
    finally:
        log = converter.stop()
    assert row["sop_instance_uid"] == received["sop_instance_uid"]
    assert np.array_equal(pydicom.dcmread(row["path"]).pixel_array, pydicom.dcmread(source).pixel_array)
    assert not Path(received["path"]).exists() or received["path"] == row["path"]
    assert not (gateway.data_dir / "replaced").exists(), "the same image is not kept twice"
    assert row["received_at"] == received["received_at"] and row["calling_ae"] == "STORESCU"
    assert "stored as JPEG-LS Lossless" in log


def test_lossy_store_makes_a_derived_instance_and_a_resend_is_a_duplicate(make_appliance) -> None:
    gateway = _gateway(make_appliance, format="lossy", lossy_syntax="JPEG2000")
    source = TEST_FILES / "CT_small.dcm"
    original_uid = pydicom.dcmread(source).SOPInstanceUID
    assert storescu(gateway.port, [source]).returncode == 0
    converter = _Converter(gateway)
    try:
        (row,) = wait_for(lambda: [r for r in gateway.find()
                                    if r["transfer_syntax_uid"] == uid.JPEG2000])
    finally:
        converter.stop()
    assert row["sop_instance_uid"] != original_uid
    ds = pydicom.dcmread(row["path"])
    assert ds.LossyImageCompression == "01" and ds.ImageType[0] == "DERIVED"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == original_uid
    assert len(gateway.find()) == 1, "the original is replaced by its lossy version"
    # The modality sends the original again: a duplicate, not a second lossy copy.
    result = storescu(gateway.port, [source])
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert [r["sop_instance_uid"] for r in gateway.find()] == [row["sop_instance_uid"]]


def test_lossy_data_is_never_recompressed_losslessly(make_appliance) -> None:
    gateway = _gateway(make_appliance, format="lossless")
    source = TEST_FILES / "SC_rgb_dcmtk_+eb+cy+np.dcm"  # JPEG baseline
    assert storescu(gateway.port, [source], "-xy").returncode == 0
    converter = _Converter(gateway)
    time.sleep(2)
    converter.stop()
    (row,) = gateway.find()
    assert row["transfer_syntax_uid"] == uid.JPEGBaseline8Bit


def test_what_cannot_be_converted_stays_as_received(make_appliance) -> None:
    gateway = _gateway(make_appliance, format="lossy", lossy_syntax="JPEGBaseline8Bit")
    source = TEST_FILES / "CT_small.dcm"  # 16-bit: JPEG Baseline cannot hold it
    assert storescu(gateway.port, [source]).returncode == 0
    converter = _Converter(gateway)
    db = gateway.data_dir / "index.sqlite"

    def kept() -> bool:
        import sqlite3

        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT state, detail FROM conversions").fetchone()
        return row is not None and row[0] == "kept" and "JPEG Baseline" in row[1]

    try:
        wait_for(kept)
    finally:
        log = converter.stop()
    (row,) = gateway.find()
    assert row["transfer_syntax_uid"] == uid.ExplicitVRLittleEndian
    assert "stays as received" in log


def test_uncompressed_store_decompresses(make_appliance) -> None:
    gateway = _gateway(make_appliance, format="uncompressed")
    source = TEST_FILES / "MR_small_jp2klossless.dcm"
    assert storescu(gateway.port, [source], "-xv").returncode == 0
    converter = _Converter(gateway)
    try:
        (row,) = wait_for(lambda: [r for r in gateway.find()
                                    if r["transfer_syntax_uid"] == uid.ExplicitVRLittleEndian])
    finally:
        converter.stop()
    assert np.array_equal(pydicom.dcmread(row["path"]).pixel_array,
                          pydicom.dcmread(source).pixel_array)


def test_status_shows_the_converter(make_appliance) -> None:
    gateway = _gateway(make_appliance, format="lossless")
    report = json.loads(gateway.cli("status", "--json", check=False).stdout)
    convert = next(s for s in report["services"] if s["service"] == "convert")
    assert convert["enabled"] and convert["state"] == "stopped"


def _refusals(gateway) -> int:
    report = json.loads(gateway.cli("status", "--json", check=False).stdout)
    return report["archive"]["conversions_refused"]


def _metrics(gateway) -> str:
    """/metrics as the web service builds it, from the same report `status --json` prints."""
    from appliance.web.metrics import exposition

    report = json.loads(gateway.cli("status", "--json", check=False).stdout)
    return exposition(lambda: report).decode()


def test_corrupt_and_mislabelled_pixel_data_stays_as_received(make_appliance, tmp_path: Path) -> None:
    """Through the receiver and through import: a stream the decoders reject, or whose frame is
    not the size the header says, is never converted; one WARNING each, no traceback, counted."""
    from tests import bad_inputs

    gateway = _gateway(make_appliance, format="uncompressed")
    garbage = bad_inputs.save(bad_inputs.corrupt_jpeg("garbage"), tmp_path / "garbage.dcm")
    wrong_size = bad_inputs.save(bad_inputs.jpeg_baseline(rows=120, columns=160), tmp_path / "size.dcm")
    assert storescu(gateway.port, [garbage, wrong_size], "-xy").returncode == 0
    (tmp_path / "in").mkdir()
    imported = bad_inputs.save(bad_inputs.corrupt_jpeg("truncated"), tmp_path / "in" / "truncated.dcm")
    gateway.cli("import", str(tmp_path / "in"))
    sources = {bad_inputs.read(p).SOPInstanceUID: p for p in (garbage, wrong_size, imported)}
    converter = _Converter(gateway)
    try:
        wait_for(lambda: _refusals(gateway) == 3, 60, "three refusals")
    finally:
        log = converter.stop()
    assert "Traceback" not in log
    rows = {r["sop_instance_uid"]: r for r in gateway.find()}
    assert set(rows) == set(sources)
    for sop_uid, source in sources.items():
        row = rows[sop_uid]
        assert row["transfer_syntax_uid"] == uid.JPEGBaseline8Bit, "kept as received"
        assert bad_inputs.read(Path(row["path"])).PixelData == bad_inputs.read(source).PixelData
        (line,) = [line for line in log.splitlines() if sop_uid in line]
        assert " WARNING " in line and "kept as received" in line, line
    assert "320x240" in log and "decoder" in log
    assert "appliance_conversions_refused_total 3.0" in _metrics(gateway)
