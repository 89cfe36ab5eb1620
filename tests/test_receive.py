"""Receiving: DCMTK storescu into the real service, every transfer syntax, byte for byte.

"What was sent" is what DCMTK put on the wire, which is not always the source
file (storescu drops trailing padding, re-deflates). So every file is also
sent, with the same storescu options, to a DCMTK storescp in bit-preserving
mode (+B), and the appliance's file must hold exactly the dataset storescp
wrote.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import (
    CHARSET_FILES,
    STORESCP,
    TEST_FILES,
    dataset_bytes,
    dcmtk_env,
    echo,
    free_port,
    storescu,
)

# (storescu option that proposes the syntax, pydicom test file) for each syntax.
SYNTAXES = {
    "1.2.840.10008.1.2.1": ("-xe", ["CT_small.dcm", "SC_rgb_small_odd.dcm"]),
    "1.2.840.10008.1.2": ("-xi", ["MR_small_implicit.dcm", "rtdose.dcm"]),
    "1.2.840.10008.1.2.2": ("-xb", ["MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm"]),
    "1.2.840.10008.1.2.1.99": ("-xd", ["image_dfl.dcm"]),
    "1.2.840.10008.1.2.5": ("-xr", ["MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_32bit.dcm"]),
    "1.2.840.10008.1.2.4.50": ("-xy", ["SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_jpeg_no_color_transform.dcm"]),
    "1.2.840.10008.1.2.4.51": ("-xx", ["JPEG-lossy.dcm", "JPGExtended.dcm"]),
    "1.2.840.10008.1.2.4.70": ("-xs", ["SC_rgb_jpeg_gdcm.dcm"]),
    "1.2.840.10008.1.2.4.80": ("-xt", ["MR_small_jpeg_ls_lossless.dcm"]),
    "1.2.840.10008.1.2.4.81": ("-xu", ["JPEGLSNearLossless_16.dcm"]),
    "1.2.840.10008.1.2.4.90": ("-xv", ["MR_small_jp2klossless.dcm"]),
    "1.2.840.10008.1.2.4.91": ("-xw", ["JPEG2000.dcm", "693_J2KI.dcm"]),
}


@pytest.fixture
def reference_scp(tmp_path: Path):
    """DCMTK storescp writing exactly what it receives (+B), as the reference."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "+xa", "+B", "-aet", "GATEWAY", "-od", str(out), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while echo(port) != 0:
        assert time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.1)
    yield port, out
    proc.terminate()
    proc.wait(timeout=10)


def _sent_by_dcmtk(port: int, out: Path, option: str, source: Path) -> Path:
    for old in out.iterdir():
        old.unlink()
    result = storescu(port, [source], option)
    assert result.returncode == 0, result.stdout + result.stderr
    (written,) = list(out.iterdir())
    return written


def test_echo(appliance) -> None:
    assert echo(appliance.port) == 0


def test_every_transfer_syntax_is_acked_indexed_and_byte_identical(appliance, reference_scp) -> None:
    ref_port, ref_dir = reference_scp
    checked = 0
    for syntax, (option, names) in SYNTAXES.items():
        for name in names:
            source = TEST_FILES / name
            sent = _sent_by_dcmtk(ref_port, ref_dir, option, source)
            result = storescu(appliance.port, [source], option)
            assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
            assert "Received Store Response (Success)" in result.stdout + result.stderr, name
            uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
            (row,) = [r for r in appliance.find() if r["sop_instance_uid"] == uid]
            assert row["transfer_syntax_uid"] == syntax, name
            stored = Path(row["path"])
            assert stored.is_relative_to(appliance.data_dir / "archive")
            data = stored.read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
            assert row["size"] == len(data)
            assert dataset_bytes(stored) == dataset_bytes(sent), f"{name}: dataset differs from what was sent"
            assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax
            checked += 1
    assert checked >= 8 and len(SYNTAXES) >= 8


def test_index_holds_what_engineers_search_by(appliance) -> None:
    source = TEST_FILES / "CT_small.dcm"
    assert storescu(appliance.port, [source]).returncode == 0
    (row,) = appliance.find("--patient-id", "1CT1")
    ds = pydicom.dcmread(source)
    assert row["patient_name"] == str(ds.PatientName)
    assert row["study_instance_uid"] == ds.StudyInstanceUID
    assert row["series_instance_uid"] == ds.SeriesInstanceUID
    assert row["modality"] == "CT"
    assert row["study_date"] == ds.StudyDate
    assert row["sex"] == ds.PatientSex
    assert row["calling_ae"] == "STORESCU"
    assert row["received_at"].startswith(time.strftime("%Y-%m-%d"))
    assert row["path"].endswith(f"/archive/{ds.StudyDate}/CT-1CT1/{ds.SOPInstanceUID}.dcm")
    assert appliance.find("--modality", "CT", "--study-date", ds.StudyDate) == [row]
    assert appliance.find("--study-date", "19990101-20001231") == []
    assert appliance.find("--modality", "MR") == []


@pytest.mark.parametrize(
    ("name", "expected_fragment"),
    [
        ("chrH31.dcm", "山田^太郎"),  # ISO 2022 IR 87
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ"),  # ISO 2022 IR 13 \ ISO 2022 IR 87 (half-width kana)
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),  # ISO_IR 192
    ],
)
def test_japanese_names_are_decoded(appliance, name: str, expected_fragment: str) -> None:
    source = CHARSET_FILES / name
    ds = pydicom.dcmread(source)
    assert storescu(appliance.port, [source]).returncode == 0
    (row,) = [r for r in appliance.find() if r["sop_instance_uid"] == ds.SOPInstanceUID]
    assert expected_fragment in row["patient_name"]
    assert row["patient_name"] == str(ds.PatientName)
    assert appliance.find("--patient-name", expected_fragment.split("^")[0]) == [row]


def test_same_instance_again(appliance, tmp_path: Path) -> None:
    source = TEST_FILES / "CT_small.dcm"
    assert storescu(appliance.port, [source]).returncode == 0
    (first,) = appliance.find()
    # Identical bytes: a no-op success.
    result = storescu(appliance.port, [source])
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert appliance.find() == [first]
    assert not (appliance.data_dir / "replaced").exists()
    # Different bytes, same SOP Instance UID: replaced, the old file kept.
    ds = pydicom.dcmread(source)
    ds.StudyDescription = "corrected"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    result = storescu(appliance.port, [changed])
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    (second,) = appliance.find()
    assert second["sha256"] != first["sha256"]
    assert pydicom.dcmread(second["path"]).StudyDescription == "corrected"
    kept = list((appliance.data_dir / "replaced").rglob("*.dcm"))
    assert len(kept) == 1
    assert hashlib.sha256(kept[0].read_bytes()).hexdigest() == first["sha256"]
    assert "received again with different content" in appliance.log()
    assert str(kept[0]) in appliance.log()


def test_status_reports_service_and_images(appliance) -> None:
    assert storescu(appliance.port, [TEST_FILES / "CT_small.dcm"]).returncode == 0
    report = json.loads(appliance.cli("status", "--json").stdout)
    (dicom,) = [s for s in report["services"] if s["service"] == "dicom"]
    assert dicom["state"] == "running"
    assert dicom["pid"] == appliance.process.pid
    assert report["archive"]["instances_today"] == 1
    assert report["disk"]["free_bytes"] > 0
    text = appliance.cli("status").stdout
    assert "dicom      running" in text
    assert "Images today:  1" in text
