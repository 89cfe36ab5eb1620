"""Every name a Patient ID arrived with is kept, found, and two names under one ID are shown.

A modality sending a second name for the same ID is the first clue of a
wrong-patient image: the index must not quietly keep only the last name.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.conftest import TEST_FILES, free_port, storescu, write_config
from tests.web_helpers import browse, visible_text, web_service


def _renamed(tmp_path: Path, name: str, patient_name: str, charset: str = "ISO_IR 192") -> Path:
    """CT_small as another instance of patient 1CT1 under `patient_name`."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = charset
    ds.PatientName = patient_name
    path = tmp_path / name
    ds.save_as(path)
    return path


def test_two_names_under_one_id_are_kept_found_and_warned(make_appliance, tmp_path: Path) -> None:
    gateway = make_appliance()
    first = _renamed(tmp_path, "first.dcm", "Yamada^Taro=山田^太郎")
    second = _renamed(tmp_path, "second.dcm", "Suzuki^Hanako=鈴木^花子")
    third = _renamed(tmp_path, "third.dcm", "Suzuki^Hanako=鈴木^花子")
    for path in (first, second, third):
        assert storescu(gateway.port, [path]).returncode == 0

    rows = gateway.find("--patient-id", "1CT1")
    assert len(rows) == 3
    assert {r["patient_name"] for r in rows} == {"Suzuki^Hanako=鈴木^花子"}  # the newest name
    arrived = sorted(r["arrived_patient_name"] for r in rows)
    assert arrived == ["Suzuki^Hanako=鈴木^花子", "Suzuki^Hanako=鈴木^花子", "Yamada^Taro=山田^太郎"]
    # The earlier name still finds the patient, in either script.
    assert len(gateway.find("--patient-name", "Yamada")) == 3
    assert len(gateway.find("--patient-name", "山田")) == 3
    assert len(gateway.find("--patient-name", "鈴木")) == 3
    assert gateway.find("--patient-name", "Tanaka") == []

    report = json.loads(gateway.cli("status", "--json").stdout)
    assert report["archive"]["patient_ids_with_several_names"] == 1
    (entry,) = report["archive"]["several_names"]
    assert entry["patient_id"] == "1CT1"
    assert [(n["patient_name"], n["arrivals"]) for n in entry["names"]] == [
        ("Yamada^Taro=山田^太郎", 1), ("Suzuki^Hanako=鈴木^花子", 2)]
    text = gateway.cli("status").stdout
    assert ("WARNING: patient ID 1CT1 arrived under 2 names: Yamada^Taro=山田^太郎 (1), "
            "Suzuki^Hanako=鈴木^花子 (2); check for a wrong patient") in text

    port = free_port()
    config = write_config(tmp_path / "web.toml", {**gateway.node}, web_port=port)
    with web_service(config, port, tmp_path / "web.log"):
        page = visible_text(browse(port))
        assert "Needs attention (1)" in page, page
        assert "patient ID 1CT1 arrived under 2 names" in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert "appliance_patient_ids_with_several_names 1.0" in r.read().decode()


def test_one_name_or_a_missing_name_is_no_warning(make_appliance, tmp_path: Path) -> None:
    gateway = make_appliance()
    named = _renamed(tmp_path, "named.dcm", "Yamada^Taro")
    again = _renamed(tmp_path, "again.dcm", "Yamada^Taro")
    unnamed = _renamed(tmp_path, "unnamed.dcm", "")
    assert storescu(gateway.port, [named, again, unnamed]).returncode == 0
    report = json.loads(gateway.cli("status", "--json").stdout)
    assert report["archive"]["patient_ids_with_several_names"] == 0
    assert "arrived under" not in gateway.cli("status").stdout
    assert len(gateway.find("--patient-name", "Yamada")) == 3


def test_an_older_index_learns_the_names_it_has(make_appliance, tmp_path: Path) -> None:
    """An index made before names were kept is upgraded: what it knows is still found."""
    gateway = make_appliance()
    assert storescu(gateway.port, [_renamed(tmp_path, "a.dcm", "Yamada^Taro")]).returncode == 0
    gateway.stop()
    db = sqlite3.connect(gateway.data_dir / "index.sqlite")
    db.executescript("DROP TABLE patient_names; ALTER TABLE instances DROP COLUMN patient_name; "
                     "PRAGMA user_version = 6;")
    db.close()
    gateway.start()  # the receiver upgrades the index
    (row,) = gateway.find("--patient-name", "Yamada")
    assert row["arrived_patient_name"] == "Yamada^Taro"
    assert storescu(gateway.port, [_renamed(tmp_path, "b.dcm", "Tanaka^Jiro")]).returncode == 0
    report = json.loads(gateway.cli("status", "--json").stdout)
    assert report["archive"]["patient_ids_with_several_names"] == 1
